"""BN-Inception (Ioffe & Szegedy, 2015), the paper's second backbone (Table 1's IBN^512 rows).

Neither torchvision nor timm ships it, so the architecture is written here with ``torch.nn``
from its published layout: a 7x7/2 stem, a 3x3 stem, then ten inception blocks (3a-3c,
4a-4e, 5a-5b) whose branches are 1x1; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3; pool -> 1x1, every
convolution followed by BatchNorm and ReLU. Parameter names follow the Caffe port that the
DML literature (and the authors' code, via Cadene's ``pretrainedmodels``) uses, so its ImageNet
weights file loads as is. The network expects BGR inputs on a 0-255 scale minus the Caffe
mean; the preprocessing normalises RGB with the matching mean / std (the authors'
``dataset/basic_dataset_scaffold.py``) and ``forward`` flips the channels to BGR.

The weights are read from a local file only (offline): see ``weights_path``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The Caffe-port weights as published for ``pretrainedmodels`` (ImageNet, 1000 classes); an
# older copy of the same port, under another name, is accepted too.
WEIGHTS_FILE = "bn_inception-239d2248.pth"
WEIGHTS_URL = "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-239d2248.pth"
OTHER_NAMES = ("bn_inception-52deb4733.pth",)


@dataclass(frozen=True)
class _Block:
    """One inception block: input channels and branch widths (``None``: branch absent)."""

    name: str
    cin: int
    b1x1: int | None  # 1x1 branch
    reduce3: int  # 1x1 -> 3x3 branch
    out3: int
    reduce_double: int  # 1x1 -> 3x3 -> 3x3 branch
    out_double: int
    pool: str  # "avg" (3x3/1), "max" (3x3/1) or "max-s2" (3x3/2, no projection: a reduction block)
    proj: int | None  # 1x1 after the pool

    @property
    def stride(self) -> int:
        return 2 if self.pool == "max-s2" else 1

    @property
    def cout(self) -> int:
        pool_out = self.cin if self.proj is None else self.proj
        return (self.b1x1 or 0) + self.out3 + self.out_double + pool_out


BLOCKS = (
    _Block("3a", 192, 64, 64, 64, 64, 96, "avg", 32),
    _Block("3b", 256, 64, 64, 96, 64, 96, "avg", 64),
    _Block("3c", 320, None, 128, 160, 64, 96, "max-s2", None),
    _Block("4a", 576, 224, 64, 96, 96, 128, "avg", 128),
    _Block("4b", 576, 192, 96, 128, 96, 128, "avg", 128),
    _Block("4c", 576, 160, 128, 160, 128, 160, "avg", 128),
    _Block("4d", 608, 96, 128, 192, 160, 192, "avg", 128),
    _Block("4e", 608, None, 128, 192, 192, 256, "max-s2", None),
    _Block("5a", 1056, 352, 192, 320, 160, 224, "avg", 128),
    _Block("5b", 1024, 352, 192, 320, 192, 224, "max", 128),
)


class BNInceptionFeatures(nn.Module):
    """The convolutional trunk: images ``(B, 3, H, W)`` (BGR, Caffe scale) to ``(B, 1024, H/32, W/32)``."""

    out_channels = 1024

    def __init__(self) -> None:
        super().__init__()
        self._unit("conv1_7x7_s2", 3, 64, 7, stride=2, padding=3)
        self._unit("conv2_3x3_reduce", 64, 64, 1)
        self._unit("conv2_3x3", 64, 192, 3, padding=1)
        for b in BLOCKS:
            p = f"inception_{b.name}"
            if b.b1x1 is not None:
                self._unit(f"{p}_1x1", b.cin, b.b1x1, 1)
            self._unit(f"{p}_3x3_reduce", b.cin, b.reduce3, 1)
            self._unit(f"{p}_3x3", b.reduce3, b.out3, 3, stride=b.stride, padding=1)
            self._unit(f"{p}_double_3x3_reduce", b.cin, b.reduce_double, 1)
            self._unit(f"{p}_double_3x3_1", b.reduce_double, b.out_double, 3, padding=1)
            self._unit(f"{p}_double_3x3_2", b.out_double, b.out_double, 3, stride=b.stride, padding=1)
            if b.proj is not None:
                self._unit(f"{p}_pool_proj", b.cin, b.proj, 1)
        for prev, nxt in zip(BLOCKS, BLOCKS[1:], strict=False):
            assert prev.cout == nxt.cin, (prev.name, prev.cout, nxt.cin)
        assert BLOCKS[-1].cout == self.out_channels

    def _unit(self, name: str, cin: int, cout: int, k: int, *, stride: int = 1, padding: int = 0) -> None:
        self.add_module(name, nn.Conv2d(cin, cout, k, stride=stride, padding=padding))
        self.add_module(f"{name}_bn", nn.BatchNorm2d(cout))

    def _cbr(self, name: str, x: torch.Tensor) -> torch.Tensor:
        conv, bn = getattr(self, name), getattr(self, f"{name}_bn")
        return F.relu(bn(conv(x)), inplace=True)

    def _block(self, b: _Block, x: torch.Tensor) -> torch.Tensor:
        p = f"inception_{b.name}"
        out = []
        if b.b1x1 is not None:
            out.append(self._cbr(f"{p}_1x1", x))
        out.append(self._cbr(f"{p}_3x3", self._cbr(f"{p}_3x3_reduce", x)))
        d = self._cbr(f"{p}_double_3x3_reduce", x)
        out.append(self._cbr(f"{p}_double_3x3_2", self._cbr(f"{p}_double_3x3_1", d)))
        if b.pool == "avg":
            pooled = F.avg_pool2d(x, 3, stride=1, padding=1, ceil_mode=True, count_include_pad=True)
        elif b.pool == "max":
            pooled = F.max_pool2d(x, 3, stride=1, padding=1, ceil_mode=True)
        else:
            pooled = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
        out.append(pooled if b.proj is None else self._cbr(f"{p}_pool_proj", pooled))
        return torch.cat(out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self._cbr("conv1_7x7_s2", x), 3, stride=2, ceil_mode=True)
        x = self._cbr("conv2_3x3", self._cbr("conv2_3x3_reduce", x))
        x = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
        for b in BLOCKS:
            x = self._block(b, x)
        return x


def weights_path() -> Path:
    """Where the ImageNet weights are looked for: torch's hub cache, like torchvision's (the
    first existing of ``WEIGHTS_FILE`` and ``OTHER_NAMES``; ``WEIGHTS_FILE`` when none is)."""
    import torch.hub

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return next((folder / n for n in (WEIGHTS_FILE, *OTHER_NAMES) if (folder / n).is_file()), folder / WEIGHTS_FILE)


def load_imagenet_weights(features: BNInceptionFeatures, path: Path) -> None:
    """Load the Caffe-port state dict (the classifier ``last_linear`` is dropped). Some copies
    of the file store BatchNorm vectors as ``(1, C)``: reshaped when the sizes agree."""
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    own = features.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for key, target in own.items():
        if key.endswith("num_batches_tracked"):
            loaded[key] = target
            continue
        value = state.get(key)
        if not isinstance(value, torch.Tensor) or value.numel() != target.numel():
            got = "missing" if value is None else f"shape {tuple(getattr(value, 'shape', ()))}"
            raise ValueError(f"{key}: {got}, the model needs shape {tuple(target.shape)}")
        loaded[key] = value.reshape(target.shape).to(target.dtype)
    features.load_state_dict(loaded)
