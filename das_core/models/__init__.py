"""Embedding networks: backbone + linear embedding layer + L2 normalisation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from das_core.models.backbones import Backbone, ModelError, build_backbone
from das_core.models.preprocessing import Preprocessing

if TYPE_CHECKING:
    from das_core.training.config import TrainConfig

BACKBONE_NAMES = ("small-cnn", "resnet50", "efficientnet-lite0", "bn-inception")


class EmbeddingNet(nn.Module):
    """``x -> normalize(W · backbone(x) + b)``: unit-length embeddings of ``embedding_dim``.

    With ``normalize_train=False`` the training forward returns the raw ``W · backbone(x) + b``
    (the authors' lifted / N-pair runs); in eval mode the output is always unit length, since
    evaluation, the index and the maps compare unit vectors."""

    def __init__(
        self, backbone: Backbone, embedding_dim: int, preprocessing: Preprocessing, *, normalize_train: bool = True
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.embed = nn.Linear(backbone.out_features, embedding_dim)
        self.embedding_dim = embedding_dim
        self.preprocessing = preprocessing
        self.normalize_train = normalize_train

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e: torch.Tensor = self.embed(self.backbone(x)).float()
        if self.training and not self.normalize_train:
            return e
        return F.normalize(e, dim=-1)


def build_model(cfg: TrainConfig, *, pretrained: bool | None = None) -> EmbeddingNet:
    """The embedding network of ``cfg`` (``pretrained`` overrides ``cfg.pretrained``: loading a
    checkpoint needs no ImageNet weights, they are overwritten anyway)."""
    backbone = build_backbone(
        cfg.backbone,
        pretrained=cfg.pretrained if pretrained is None else pretrained,
        freeze_bn=cfg.freeze_bn,
        pooling=cfg.pooling,
        freeze_affine=cfg.freeze_bn_affine,
    )
    prep = backbone.preprocessing.with_size(cfg.image_size)
    return EmbeddingNet(backbone, cfg.embedding_dim, prep, normalize_train=cfg.normalize_embeddings)


__all__ = ["BACKBONE_NAMES", "Backbone", "EmbeddingNet", "ModelError", "Preprocessing", "build_backbone", "build_model"]
