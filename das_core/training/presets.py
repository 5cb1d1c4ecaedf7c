"""Named starting points for training: the paper's settings and fast CPU demos."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from das_core.training.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class Preset:
    description: str
    values: dict[str, Any] = field(default_factory=dict)

    def config(self, **overrides: Any) -> TrainConfig:
        return TrainConfig.from_mapping({**self.values, **overrides})


# The authors' recipe around DAS (lizhaoliu-Lec/DAS at 4f2a357; docs/paper-recipe.md gives the
# file and line of every value): ResNet-50 with BatchNorm statistics frozen but affine weights
# training, Adam lr 1e-5, weight decay 4e-4, 112 images drawn 2 per class *with replacement*,
# 300 epochs with lr x 0.3 after 200 and 250 epochs, the authors' bank overflow, MS beta 40.
_PAPER = {
    "backbone": "resnet50",
    "pretrained": True,
    "freeze_bn": True,
    "freeze_bn_affine": False,
    "optimizer": "adam",
    "lr": 1e-5,
    "weight_decay": 4e-4,
    "batch_size": 112,
    "samples_per_class": 2,
    "class_sampling": "replacement",
    "epochs": 300,
    "lr_schedule": "multistep",
    "lr_milestones": (200, 250),
    "lr_factor": 0.3,
    "ms_beta": 40.0,
    "das": True,
    "das_num_produce": 3,
    "das_topk": 4,
    "das_bank_size": 10,
    "das_r_s": 0.01,
    "das_r_b": 0.01,
    "das_detach": True,
    "das_bank_overflow": "authors",
    "val_classes": 0,
}
# The 512-d state-of-the-art table (table1.sh): average + max pooling, multi-similarity, K = 8.
_MS512 = {
    **_PAPER,
    "embedding_dim": 512,
    "pooling": "avg+max",
    "loss": "multi-similarity",
    "miner": "multi-similarity",
    "das_topk": 8,
}
# Lifted and N-pair (table2.sh): unnormalised embeddings, no DAS normalisation, L2 penalty 0.005.
_UNNORMALISED = {
    "normalize_embeddings": False,
    "das_normalize": False,
    "embedding_l2": 0.005,
    "miner": "none",
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
        "CUB-200-2011, ResNet-50 128-d, triplet (squared, mean over all) + distance-weighted + DAS "
        "(paper Table 2, the authors' recipe)",
        {**_PAPER, "dataset": "cub200", "embedding_dim": 128, "loss": "triplet", "triplet_form": "squared",
         "miner": "distance-weighted"},
    ),
    "paper-cars-triplet": Preset(
        "CARS196, ResNet-50 128-d, triplet (squared, mean over all) + distance-weighted + DAS "
        "(paper Table 2, the authors' recipe)",
        {**_PAPER, "dataset": "cars196", "embedding_dim": 128, "loss": "triplet", "triplet_form": "squared",
         "miner": "distance-weighted"},
    ),
    "paper-cub-margin": Preset(
        "CUB-200-2011, ResNet-50 128-d, margin loss (beta lr 5e-4) + distance-weighted + DAS (paper Table 2)",
        {**_PAPER, "dataset": "cub200", "embedding_dim": 128, "loss": "margin", "miner": "distance-weighted",
         "loss_lr": 5e-4},
    ),
    "paper-cub-lifted": Preset(
        "CUB-200-2011, ResNet-50 128-d, lifted structure, unnormalised embeddings + L2 penalty, DAS "
        "(paper Table 2)",
        {**_PAPER, **_UNNORMALISED, "dataset": "cub200", "embedding_dim": 128, "loss": "lifted"},
    ),
    "paper-cub-npair": Preset(
        "CUB-200-2011, ResNet-50 128-d, N-pair, unnormalised embeddings + L2 penalty, DAS (paper Table 2)",
        {**_PAPER, **_UNNORMALISED, "dataset": "cub200", "embedding_dim": 128, "loss": "npair"},
    ),
    "paper-cub-ms512": Preset(
        "CUB-200-2011, ResNet-50 512-d avg+max pooling, multi-similarity + DAS K=8, batch 180, weight decay "
        "8e-4 (paper Table 1, the authors' recipe)",
        {**_MS512, "dataset": "cub200", "batch_size": 180, "weight_decay": 8e-4},
    ),
    "paper-cars-ms512": Preset(
        "CARS196, ResNet-50 512-d avg+max pooling, multi-similarity + DAS K=8 (paper Table 1, the authors' recipe)",
        {**_MS512, "dataset": "cars196"},
    ),
    "paper-sop-ms512": Preset(
        "Stanford Online Products, ResNet-50 512-d, multi-similarity + DAS K=8, gamma ~ U[0.5, 2.0), r_b = 0.1, "
        "no detach (paper Table 1, the authors' recipe)",
        {**_MS512, "dataset": "sop", "das_gamma_low": 0.5, "das_gamma_high": 2.0, "das_r_b": 0.1,
         "das_detach": False},
    ),
    "paper-cub-ms512-bninception": Preset(
        "CUB-200-2011, BN-Inception 512-d avg+max pooling, multi-similarity + DAS K=8 (paper Table 1, IBN^512; "
        "needs the BN-Inception weights file, see README)",
        {**_MS512, "backbone": "bn-inception", "dataset": "cub200"},
    ),
    "paper-cars-ms512-bninception": Preset(
        "CARS196, BN-Inception 512-d avg+max pooling, multi-similarity + DAS K=8 (paper Table 1, IBN^512)",
        {**_MS512, "backbone": "bn-inception", "dataset": "cars196"},
    ),
    "paper-sop-ms512-bninception": Preset(
        "Stanford Online Products, BN-Inception 512-d, multi-similarity + DAS K=8, gamma ~ U[0.5, 2.0), r_b = 0.1, "
        "no detach (paper Table 1, IBN^512)",
        {**_MS512, "backbone": "bn-inception", "dataset": "sop", "das_gamma_low": 0.5, "das_gamma_high": 2.0,
         "das_r_b": 0.1, "das_detach": False},
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
