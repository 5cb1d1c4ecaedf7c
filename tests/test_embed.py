"""Embedding a dataset: the fused, channels_last inference copy gives the model's own numbers."""

from __future__ import annotations

import numpy as np
import torch

from das_core.config import TrainConfig
from das_core.data import load_splits
from das_core.embed import embed_dataset, inference_model
from das_core.models import build_model


def test_inference_copy_folds_batchnorm_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = build_model(TrainConfig(dataset="digits", backbone="small-cnn", embedding_dim=16))
    # give BatchNorm non-trivial statistics, as a trained model has
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 1, 28, 28) * 2 + 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = inference_model(model)
    assert model.training  # the caller's model keeps its mode ...
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # ... and weights
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # folded away
    x = torch.randn(8, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        got = net(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_embed_dataset_matches_a_plain_forward() -> None:
    splits = load_splits("digits")
    ds = splits.test
    torch.manual_seed(1)
    model = build_model(TrainConfig(dataset="digits", backbone="small-cnn", embedding_dim=16)).eval()
    emb, labels = embed_dataset(model, ds, batch_size=100)
    assert emb.shape == (len(ds), 16) and emb.dtype == np.float32
    np.testing.assert_array_equal(labels, ds.labels)
    prep = model.preprocessing
    x = torch.stack([prep.eval_transform()(ds.load_image(i)) for i in range(5)])
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(emb[:5], ref, atol=1e-5)
