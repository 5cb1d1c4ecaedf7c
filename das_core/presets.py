"""Named starting points for training: the paper's settings and fast CPU demos."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from das_core.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class Preset:
    description: str
    values: dict[str, Any] = field(default_factory=dict)

    def config(self, **overrides: Any) -> TrainConfig:
        return TrainConfig.from_mapping({**self.values, **overrides})


_PAPER = {
    "backbone": "resnet50",
    "pretrained": True,
    "freeze_bn": True,
    "optimizer": "adam",
    "lr": 1e-5,
    "weight_decay": 4e-4,
    "batch_size": 112,
    "samples_per_class": 2,
    "das": True,
    "das_num_produce": 3,
    "das_topk": 4,
    "das_bank_size": 10,
    "das_r_s": 0.01,
    "das_r_b": 0.01,
    "das_detach": True,
    "epochs": 150,
    "val_classes": 0,
}

PRESETS: dict[str, Preset] = {
    "cpu-demo": Preset(
        "Fashion-MNIST, small CNN, triplet + semi-hard + DAS: the embedded demo model (a few minutes on CPU)",
        {
            "dataset": "fashion-mnist",
            "backbone": "small-cnn",
            "embedding_dim": 128,
            "loss": "triplet",
            "miner": "semi-hard",
            "das": True,
            "batch_size": 100,
            "samples_per_class": 20,
            "epochs": 5,
            "lr": 1e-3,
            "weight_decay": 4e-4,
            "val_fraction": 0.1,
        },
    ),
    "cpu-quick": Preset(
        "digits, small CNN, 2 epochs: a smoke test in seconds",
        {
            "dataset": "digits",
            "backbone": "small-cnn",
            "embedding_dim": 64,
            "loss": "triplet",
            "miner": "semi-hard",
            "batch_size": 50,
            "samples_per_class": 10,
            "epochs": 2,
            "lr": 1e-3,
        },
    ),
    "paper-cub-triplet": Preset(
        "CUB-200-2011, ResNet-50 128-d, triplet + distance-weighted + DAS (paper, pair-loss table)",
        {**_PAPER, "dataset": "cub200", "embedding_dim": 128, "loss": "triplet", "miner": "distance-weighted"},
    ),
    "paper-cars-triplet": Preset(
        "CARS196, ResNet-50 128-d, triplet + distance-weighted + DAS (paper, pair-loss table)",
        {**_PAPER, "dataset": "cars196", "embedding_dim": 128, "loss": "triplet", "miner": "distance-weighted"},
    ),
    "paper-cub-ms512": Preset(
        "CUB-200-2011, ResNet-50 512-d avg+max pooling, multi-similarity + DAS K=8 (paper, SOTA table)",
        {
            **_PAPER,
            "dataset": "cub200",
            "embedding_dim": 512,
            "pooling": "avg+max",
            "loss": "multi-similarity",
            "miner": "multi-similarity",
            "das_topk": 8,
        },
    ),
    "paper-cars-ms512": Preset(
        "CARS196, ResNet-50 512-d avg+max pooling, multi-similarity + DAS K=8 (paper, SOTA table)",
        {
            **_PAPER,
            "dataset": "cars196",
            "embedding_dim": 512,
            "pooling": "avg+max",
            "loss": "multi-similarity",
            "miner": "multi-similarity",
            "das_topk": 8,
        },
    ),
    "paper-sop-ms512": Preset(
        "Stanford Online Products, ResNet-50 512-d, multi-similarity + DAS, r_b = 0.1 (paper; the official "
        "asymmetric 0.5-2.0 scale range is approximated by r_s = 0.5)",
        {
            **_PAPER,
            "dataset": "sop",
            "embedding_dim": 512,
            "pooling": "avg+max",
            "loss": "multi-similarity",
            "miner": "multi-similarity",
            "das_r_b": 0.1,
            "das_r_s": 0.5,
            "epochs": 100,
        },
    ),
    "offline-photos": Preset(
        "any image folder, EfficientNet-Lite0 (ImageNet weights shipped offline), triplet + semi-hard + DAS",
        {
            "dataset": "folder",
            "backbone": "efficientnet-lite0",
            "embedding_dim": 128,
            "loss": "triplet",
            "miner": "semi-hard",
            "das": True,
            "batch_size": 32,
            "samples_per_class": 4,
            "lr": 1e-4,
            "epochs": 20,
        },
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError("preset", name, "unknown preset; valid presets are: " + ", ".join(PRESETS))
    return PRESETS[name]
