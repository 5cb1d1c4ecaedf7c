"""How an image becomes a model input. It belongs to the backbone and is saved with every
checkpoint, so a query image is later prepared exactly as the training images were."""

from __future__ import annotations

import json
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
    palette, 16-bit and CMYK images handled by ``das_core.images.to_mode``)."""

    def __init__(self, mode: str, background: int) -> None:
        self.mode = mode
        self.background = background

    def __call__(self, image: Image.Image) -> Image.Image:
        from das_core.images import to_mode

        return to_mode(image, self.mode, background=self.background)

    def __repr__(self) -> str:
        return f"ToMode({self.mode})"
