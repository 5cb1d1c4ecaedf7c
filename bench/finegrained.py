"""The fine-grained DAS benchmark's training core, shared by the CPU benchmark
(``bench_das_finegrained.py``, partial fine-tune on cached activations) and the GPU script
(``gpu_finegrained.py``, full fine-tune).

Why a loop here and not ``das_core.training.loop.train``: the trainer builds its network from
``--backbone`` and reads images through ``--dataset``; the CPU setting trains only the last
stage of EfficientNet-Lite0 on activations cached once, which it cannot take without a new
dataset + backbone kind. This loop is the trainer's step stripped down and calls das_core's
own pieces for everything else: ``TrainConfig`` (validated), ``build_criterion`` (loss, miner,
DAS, ``--das-grad-norm``, ``--das-exclude-own-copies``), the trainer's optimiser builder,
``MPerClassBatchSampler``, the per-epoch seeding, ``evaluate_embeddings``, ``DASDiagnostics``
and ``weight_norms``. Imports nothing of the app (no streamlit / umap / plotly).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from das_core.data import MPerClassBatchSampler
from das_core.retrieval.evaluation import evaluate_embeddings
from das_core.training.config import TrainConfig
from das_core.training.diagnostics import DASDiagnostics, weight_norms
from das_core.training.loop import _optimizer, epoch_seed
from das_core.training.losses import build_criterion

# Each benchmark cell: config overrides on top of the recipe.
LOSSES: dict[str, dict[str, Any]] = {
    "triplet/distance-weighted": {"loss": "triplet", "miner": "distance-weighted"},
    "triplet/semi-hard": {"loss": "triplet", "miner": "semi-hard"},
    "multi-similarity/multi-similarity": {"loss": "multi-similarity", "miner": "multi-similarity"},
    "contrastive/distance-weighted": {"loss": "contrastive", "miner": "distance-weighted"},
    "margin/distance-weighted": {"loss": "margin", "miner": "distance-weighted"},
}
# The "why" variants (DAS on unless das=False), each run with its own baseline control where the
# change also applies without DAS (optimiser, weight decay, the authors' triplet form and sampler).
# The first five are the key ones (run for every seed before the others).
WHY: dict[str, dict[str, Any]] = {
    "das+wd0": {"das": True, "weight_decay": 0.0},
    "baseline+wd0": {"das": False, "weight_decay": 0.0},
    "das+no-detach": {"das": True, "das_detach": False},
    "das+grad-norm": {"das": True, "das_grad_norm": True},
    "das+exclude-own": {"das": True, "das_exclude_own_copies": True},
    "das+adamw": {"das": True, "optimizer": "adamw"},
    "baseline+adamw": {"das": False, "optimizer": "adamw"},
    "das+r0.1": {"das": True, "das_r_s": 0.1, "das_r_b": 0.1},
    "das+aux1": {"das": True, "das_aux_weight": 1.0},
    "das+grad-norm+exclude-own": {"das": True, "das_grad_norm": True, "das_exclude_own_copies": True},
    # the authors' recipe pieces that apply here (their triplet loss; their sampler + bank overflow)
    "das+squared": {"das": True, "triplet_form": "squared"},
    "baseline+squared": {"das": False, "triplet_form": "squared"},
    "das+replacement-overflow": {"das": True, "class_sampling": "replacement", "das_bank_overflow": "authors"},
    "baseline+replacement": {"das": False, "class_sampling": "replacement"},
}


def tail_config(overrides: dict[str, Any], recipe: dict[str, Any]) -> TrainConfig:
    return TrainConfig.from_mapping({**recipe, **overrides})


def train_embedding(
    cfg: TrainConfig,
    net: nn.Module,
    train_x: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    train_labels: np.ndarray,
    embed_test: Callable[[nn.Module], tuple[np.ndarray, np.ndarray]],
    *,
    device: torch.device,
    diagnostics_steps: int = 4,
    autocast: bool = False,
    log: Callable[[str], None] = print,
    deadline: float | None = None,
    on_epoch: Callable[[list[dict[str, Any]]], None] | None = None,
    eval_every: int = 1,
) -> dict[str, Any]:
    """Train ``net`` (an ``EmbeddingNet``-like module with ``backbone`` and ``embed``) for
    ``cfg.epochs`` epochs on batches ``train_x(indices, generator)`` of the training items;
    evaluate the test split every epoch (R@1, MAP@R; NMI and F1 at the last epoch).

    Returns ``{"test": last-epoch metrics, "curve": per-epoch records, "seconds"}``; stops
    early (``"stopped_early": True``) when another epoch like the last would end after
    ``deadline`` (a ``time.time()``); ``on_epoch(curve)`` is called after every epoch."""
    num_classes = int(train_labels.max()) + 1
    criterion = build_criterion(cfg, num_classes).to(device)
    optimizer = _optimizer(cfg, net, criterion)  # type: ignore[arg-type]
    diag = DASDiagnostics(diagnostics_steps) if cfg.das and diagnostics_steps else None
    criterion.diagnostics = diag
    sampler = MPerClassBatchSampler(
        train_labels, cfg.batch_size, cfg.samples_per_class, num_batches=cfg.steps_per_epoch, seed=cfg.seed,
        replacement=cfg.class_sampling == "replacement",
    )
    labels_t = torch.from_numpy(train_labels.astype(np.int64)).to(device)
    aug = torch.Generator(device="cpu")
    curve: list[dict[str, Any]] = []
    started = time.time()
    test: dict[str, float] = {}
    stopped = False
    for epoch in range(1, cfg.epochs + 1):
        torch.manual_seed(epoch_seed(cfg.seed, epoch))
        aug.manual_seed(epoch_seed(cfg.seed, epoch))
        sampler.set_epoch(epoch)
        if diag is not None:
            diag.start_epoch(len(sampler))
        net.train()
        criterion.train()
        t0 = time.time()
        loss_sum = 0.0
        for idx in sampler:
            index = torch.as_tensor(idx)
            x = train_x(index, aug)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                emb = net(x)
            loss = criterion(emb.float(), labels_t[index.to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach())
        # stop here when one more epoch (as long as this one, plus its evaluation) would miss the deadline
        last = epoch == cfg.epochs or (deadline is not None and time.time() + 1.5 * (time.time() - t0) > deadline)
        rec: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": loss_sum / max(1, len(sampler)),
            "seconds": time.time() - t0,
            "weight_norm": {k: round(v, 4) for k, v in weight_norms(net).items()},
        }
        if last or epoch % eval_every == 0:  # evaluation never touches the training RNG
            emb_test, y_test = embed_test(net)
            metrics = evaluate_embeddings(emb_test, y_test, clustering=last, seed=cfg.seed)
            rec["test"] = {k: round(v, 5) for k, v in metrics.items()}
            test = rec["test"]
        if diag is not None:
            rec["das_diagnostics"] = {k: round(v, 5) for k, v in diag.summary().items()}
        curve.append(rec)
        if on_epoch is not None:
            on_epoch(curve)
        shown = rec.get("test", {"R@1": math.nan, "MAP@R": math.nan})
        log(
            f"  epoch {epoch:3d}  loss {rec['train_loss']:.4f}  R@1 {shown['R@1']:.4f}  MAP@R {shown['MAP@R']:.4f}"
            f"  |w| {rec['weight_norm'].get('backbone', 0):.2f}  {rec['seconds']:.1f}s"
        )
        if last:
            stopped = epoch < cfg.epochs
            break
    return {"test": test, "curve": curve, "seconds": time.time() - started, "stopped_early": stopped}


class Tail(nn.Module):
    """The trainable end of EfficientNet-Lite0 as an embedding network: ``blocks`` (the last
    MBConv blocks), the 1x1 head conv + BatchNorm + ReLU6, average pooling, a linear embedding
    layer, L2 normalisation. BatchNorm frozen (eval mode, no affine updates), as in the paper."""

    def __init__(self, net: nn.Module, first_block: int, embedding_dim: int) -> None:
        super().__init__()
        blocks: Any = net._blocks
        self.backbone = nn.ModuleDict(
            {
                "blocks": nn.ModuleList(list(blocks)[first_block:]),
                "head": nn.Sequential(net._conv_head, net._bn1, nn.ReLU6()),
            }
        )
        self.embed = nn.Linear(1280, embedding_dim)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for p in m.parameters():
                    p.requires_grad_(False)

    def train(self, mode: bool = True) -> Tail:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.backbone["blocks"]:  # type: ignore[union-attr]
            x = block(x)
        x = self.backbone["head"](x)
        return F.normalize(self.embed(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)).float(), dim=-1)


def load_lite0(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights (the project's backbone, its ``net``)."""
    from das_core.models.backbones import EfficientNetLite0

    backbone = EfficientNetLite0(pretrained=pretrained, freeze_bn=True, pooling="avg")
    net: nn.Module = backbone.net
    return net.eval()


def lite0_stem_and_blocks(net: nn.Module, x: torch.Tensor, upto: int) -> torch.Tensor:
    """Activations of EfficientNet-Lite0 before block ``upto`` (inputs in [-1, 1])."""
    y = net._swish(net._bn0(net._conv_stem(x)))  # type: ignore[operator]
    for block in list(net._blocks)[:upto]:  # type: ignore[arg-type]
        y = block(y)
    return y


def to_unit_range(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 ``(N, H, W[, 3])`` images -> float ``(N, 3, size, size)`` in [-1, 1] (Lite0 input)."""
    x = torch.from_numpy(images)
    if x.ndim == 3:
        x = x.unsqueeze(-1).expand(*x.shape, 3)
    x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x
