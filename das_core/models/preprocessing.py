"""How an image becomes a model input. It belongs to the backbone and is saved with every
checkpoint, so a query image is later prepared exactly as the training images were."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from PIL import Image

Augment = Literal["none", "pad-crop-flip", "rrc-flip"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to ``resize``, centre-crop ``crop`` (evaluation), convert to
    tensor and normalise. Training adds ``augment``: ``pad-crop-flip`` (pad 2 px, random
    crop, flip: small grey images) or ``rrc-flip`` (RandomResizedCrop + flip: photos)."""

    mode: Literal["L", "RGB"]
    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment = "none"
    # Grey level (0-255) that transparent pixels are composited onto: 0 for the white-on-black
    # Fashion-MNIST/digits images, 255 for photos.
    background: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("L", "RGB"):
            raise ValueError(f"preprocessing: mode must be L or RGB, not {str(self.mode)[:20]!r}")
        if self.augment not in ("none", "pad-crop-flip", "rrc-flip"):
            raise ValueError(f"preprocessing: unknown augment {str(self.augment)[:40]!r}")
        if not (1 <= self.crop <= 4096 and 1 <= self.resize <= 4096 and 0 <= self.background <= 255):
            raise ValueError("preprocessing: resize and crop must be 1-4096 pixels, background 0-255")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)) or min(self.std, default=1.0) <= 0:
            raise ValueError("preprocessing: mean and std must be finite, std > 0")
        channels = 1 if self.mode == "L" else 3
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"preprocessing: mean/std need {channels} values for mode {self.mode}")
        if self.crop > self.resize:
            raise ValueError(f"preprocessing: crop {self.crop} is larger than resize {self.resize}")

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def with_size(self, size: int | None) -> Preprocessing:
        """The same pipeline for another input size (keeping the resize/crop ratio)."""
        if size is None or size == self.crop:
            return self
        return replace(self, crop=size, resize=max(size, round(size * self.resize / self.crop)))

    # -- transforms ---------------------------------------------------------------------------
    def eval_transform(self) -> Any:
        from torchvision.transforms import v2 as T

        return T.Compose(
            [
                _ToMode(self.mode, self.background),
                T.PILToTensor(),
                T.Resize(self.resize, antialias=True),
                T.CenterCrop(self.crop),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(self.mean, self.std),
            ]
        )

    def train_transform(self) -> Any:
        from torchvision.transforms import v2 as T

        if self.augment == "none":
            return self.eval_transform()
        if self.augment == "pad-crop-flip":
            geometric = [
                T.Resize(self.crop, antialias=True),
                T.CenterCrop(self.crop),
                T.RandomCrop(self.crop, padding=max(1, self.crop // 14)),
                T.RandomHorizontalFlip(),
            ]
        else:  # rrc-flip, the protocol of the DML papers
            geometric = [T.RandomResizedCrop(self.crop, antialias=True), T.RandomHorizontalFlip()]
        return T.Compose(
            [
                _ToMode(self.mode, self.background),
                T.PILToTensor(),
                *geometric,
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(self.mean, self.std),
            ]
        )

    # -- batched path for in-memory uint8 images ------------------------------------------------
    def supports_batch(self, channels: int) -> bool:
        """Whether uint8 batches with ``channels`` channels can take the batched path
        (grey to RGB is a channel copy, exactly as PIL's convert; RGB to grey is not offered)."""
        return channels == self.channels or (channels == 1 and self.channels == 3)

    def _batch_common(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"batched preprocessing takes uint8 (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        return TF.resize(x, [self.resize], antialias=True) if min(x.shape[-2:]) != self.resize else x

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        out: torch.Tensor = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(self.mean), list(self.std))
        return out

    def eval_batch(self, x: torch.Tensor) -> torch.Tensor:
        """``eval_transform`` applied to a uint8 batch ``(B, C, H, W)`` at once (same functional
        ops, so the same numbers as the per-image path); runs on ``x``'s device."""
        from torchvision.transforms.v2 import functional as TF

        return self._finish(TF.center_crop(self._batch_common(x), [self.crop]))

    def train_batch(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``train_transform`` for a uint8 batch at once, with per-image random draws:
        pad-crop-flip by gathering per-image crop windows, rrc-flip by ``roi_align``
        (bilinear crop-and-resize of a per-image random box)."""
        from torchvision.transforms.v2 import functional as TF

        x = self._batch_common(x)
        b = x.shape[0]
        dev = x.device
        if self.augment == "none":
            return self.eval_batch(x)
        if self.augment == "pad-crop-flip":
            x = TF.center_crop(x, [self.crop])
            pad = max(1, self.crop // 14)
            padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
            oy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
            ox = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
            ar = torch.arange(self.crop, device=dev)
            bi = torch.arange(b, device=dev)[:, None, None]
            iy = (oy[:, None] + ar)[:, :, None]
            ix = (ox[:, None] + ar)[:, None, :]
            x = padded.permute(0, 2, 3, 1)[bi, iy, ix].permute(0, 3, 1, 2).contiguous()
        else:  # rrc-flip: RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)) per image
            from torchvision.ops import roi_align

            h, w = x.shape[-2:]
            area = h * w * torch.empty(b, device=dev).uniform_(0.08, 1.0, generator=generator)
            log_r = torch.empty(b, device=dev).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
            ratio = torch.exp(log_r)
            cw = torch.sqrt(area * ratio).clamp(1, w)
            ch = torch.sqrt(area / ratio).clamp(1, h)
            x0 = torch.rand(b, device=dev, generator=generator) * (w - cw)
            y0 = torch.rand(b, device=dev, generator=generator) * (h - ch)
            boxes = torch.stack([torch.arange(b, device=dev, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], 1)
            crops = roi_align(x.float(), boxes, output_size=(self.crop, self.crop), aligned=True, sampling_ratio=2)
            x = crops.round_().clamp_(0, 255).to(torch.uint8)
        flip = torch.rand(b, device=dev, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return self._finish(x)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """One image as a ``(1, C, H, W)`` evaluation batch."""
        out: torch.Tensor = self.eval_transform()(image)
        return out.unsqueeze(0)

    # -- serialisation ------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        d = json.loads(text)
        return cls(
            mode=d["mode"],
            resize=int(d["resize"]),
            crop=int(d["crop"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            augment=d.get("augment", "none"),
            background=int(d.get("background", 0)),
        )


class _ToMode:
    """Convert any PIL image to the model's mode (alpha composited onto ``background``;
    palette, 16-bit and CMYK images handled by ``das_core.data.images.to_mode``)."""

    def __init__(self, mode: str, background: int) -> None:
        self.mode = mode
        self.background = background

    def __call__(self, image: Image.Image) -> Image.Image:
        from das_core.data.images import to_mode

        return to_mode(image, self.mode, background=self.background)

    def __repr__(self) -> str:
        return f"ToMode({self.mode})"
