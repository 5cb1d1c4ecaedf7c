"""BN-Inception backbone: architecture, offline weights loading, frozen BatchNorm."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from das_core.models import ModelError, build_model
from das_core.models.bninception import BLOCKS, WEIGHTS_FILE, BNInceptionFeatures, weights_path
from das_core.training.config import TrainConfig


def test_architecture_shapes_and_block_widths() -> None:
    torch.manual_seed(0)
    feats = BNInceptionFeatures().eval()
    with torch.no_grad():
        fmap = feats(torch.randn(1, 3, 224, 224))
    # BN-Inception: 1024 channels on a 7 x 7 map for 224 x 224 inputs (stride 32)
    assert fmap.shape == (1, 1024, 7, 7)
    # the published widths: 3a 256, 3b 320, 3c 576, 4a-4c 576, 4d 608, 4e 1056, 5a-5b 1024
    assert [b.cout for b in BLOCKS] == [256, 320, 576, 576, 576, 608, 608, 1056, 1024, 1024]
    convs = [m for m in feats.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in feats.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 3 + sum(5 + (b.b1x1 is not None) + (b.proj is not None) for b in BLOCKS)


def test_embedding_model_no_pretrained_trains_a_step() -> None:
    torch.manual_seed(0)
    cfg = TrainConfig(backbone="bn-inception", pretrained=False, embedding_dim=32, pooling="avg+max", image_size=96)
    model = build_model(cfg).train()
    x = torch.rand(2, 3, 96, 96)
    out = model(x)
    assert out.shape == (2, 32)
    # L2-normalised in float32: the norm it divides by is off by <= (d/2 + 1)·2^-24 relatively
    # (d = 32: 1e-6), so measured in float64 the rows are unit within ~1e-6; 2e-6 covers it
    assert torch.allclose(out.detach().double().norm(dim=1), torch.ones(2, dtype=torch.float64), atol=2e-6)
    out.sum().backward()
    assert model.backbone.features.conv1_7x7_s2.weight.grad is not None  # type: ignore[union-attr]
    assert model.preprocessing.crop == 96 and model.preprocessing.mean == (0.502, 0.4588, 0.4078)


def test_missing_weights_name_the_file_and_the_way_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelError) as info:
        build_model(TrainConfig(backbone="bn-inception", pretrained=True))
    msg = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / WEIGHTS_FILE) in msg and "--no-pretrained" in msg


def test_weights_load_from_the_local_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file in the Caffe-port layout (flat names, BatchNorm vectors stored as (1, C) as in
    some copies, a 1000-class last_linear) loads into the model exactly."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    src = BNInceptionFeatures()
    for p in src.parameters():
        torch.nn.init.normal_(p)
    state = {k: v.clone() for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["conv1_7x7_s2_bn.weight"] = state["conv1_7x7_s2_bn.weight"].view(1, -1)
    state["last_linear.weight"] = torch.zeros(1000, 1024)
    state["last_linear.bias"] = torch.zeros(1000)
    path = weights_path()
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    model = build_model(TrainConfig(backbone="bn-inception", pretrained=True, embedding_dim=8))
    loaded = model.backbone.features.state_dict()  # type: ignore[union-attr]
    for key, value in src.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded[key], value), key
    del state["inception_5b_pool_proj.weight"]
    torch.save(state, path)
    with pytest.raises(ModelError, match="inception_5b_pool_proj.weight: missing"):
        build_model(TrainConfig(backbone="bn-inception", pretrained=True))


@pytest.mark.parametrize("freeze_affine", [True, False])
def test_frozen_batchnorm(freeze_affine: bool) -> None:
    torch.manual_seed(0)
    cfg = TrainConfig(backbone="bn-inception", pretrained=False, freeze_bn_affine=freeze_affine, embedding_dim=8)
    model = build_model(cfg).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bns]  # type: ignore[union-attr]
    model(torch.rand(2, 3, 64, 64)).sum().backward()
    assert all(not m.training for m in bns)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(bns, before, strict=True))  # type: ignore[arg-type]
    assert all((m.weight.grad is not None) is (not freeze_affine) for m in bns)
