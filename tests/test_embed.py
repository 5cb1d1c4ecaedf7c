"""Embedding a dataset: the fused, channels_last inference copy gives the model's own numbers."""

from __future__ import annotations

import numpy as np
import torch

from das_core.data import load_splits
from das_core.models import build_model
from das_core.models.embed import embed_dataset, inference_model
from das_core.training.config import TrainConfig


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
    assert got.dtype == torch.float32 and got.shape == ref.shape
    # Folding BatchNorm into the convolution is exact algebra, so the check is done in float64,
    # where no kernel's summation order (oneDNN's blocking, thread count, channels_last) shows:
    # sums of <= 432 products of size ~10 carry < 432 · 1.1e-16 · 10 ≈ 5e-13 of rounding per
    # layer, against ~1e-2 for a fold that forgets BatchNorm's eps or its shift.
    model64 = model.double()
    net64 = inference_model(model64)
    with torch.no_grad():
        ref64 = model64(x.double())
        got64 = net64(x.double().contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got64, ref64, atol=1e-10, rtol=0)


def test_embed_dataset_matches_a_plain_forward() -> None:
    splits = load_splits("digits")
    ds = splits.test
    torch.manual_seed(1)
    model = build_model(TrainConfig(dataset="digits", backbone="small-cnn", embedding_dim=16)).eval()
    emb, labels = embed_dataset(model, ds, batch_size=100)
    assert emb.shape == (len(ds), 16) and emb.dtype == np.float32
    np.testing.assert_array_equal(labels, ds.labels)
    # The first batch again, prepared image by image (eval_transform, not the batched uint8 path),
    # through the fused copy on the same batch: the same kernels on the same numbers, so bit for
    # bit on any machine. (That the fused copy computes the plain model is the float64 test above;
    # a float32 tolerance between different kernels would be a guess about this machine's BLAS.)
    prep = model.preprocessing
    x = torch.stack([prep.eval_transform()(ds.load_image(i)) for i in range(100)])
    with torch.no_grad():
        ref = inference_model(model)(x.contiguous(memory_format=torch.channels_last)).numpy()
    np.testing.assert_array_equal(emb[:100], ref)
