"""What DAS does to a training step, measured: the per-epoch "DAS diagnostics" of a run.

Measured on a few evenly spaced steps of each epoch (``--das-diagnostics-steps``; the RNG is
restored afterwards, so measuring never changes what training does):

* ``tuples``: mined tuples (triplets, or positive + negative pairs) the loss used;
  ``share_produced``: the share involving at least one produced embedding;
  ``share_own_copy``: the share pairing an embedding with one of its *own* produced copies
  (a triplet whose anchor and positive come from the same real embedding; a positive pair of
  an embedding and its copy); ``share_active``: the share of the loss's terms that are
  non-zero (PML's per-triplet / per-pair / per-element losses).
* ``loss_real`` / ``loss_produced``: the loss on the real-only tuples and on the tuples with a
  produced embedding (each reduced as the loss reduces); ``grad_real_terms`` /
  ``grad_produced_terms``: the norm of their gradients with respect to the *real* embeddings;
  ``grad_das``: the same for the loss training used; ``grad_baseline``: for the plain loss on
  the real batch alone (what training without DAS would get); ``grad_ratio`` = ``grad_das /
  grad_baseline``.
* ``produced_offset``: mean distance of a produced embedding from its source.
* ``bank_age_steps``: mean age, in steps, of the filled bank rows of the batch's classes:
  the expected age of the shift a produced embedding uses (rows are drawn uniformly).
  Tracked every step from the ring pointers (not saved: after ``--resume`` the rows count
  as written at the resume).

``weight_norms`` (every epoch, DAS or not): L2 norms of the trainable weights of the backbone,
its last trainable layer and the embedding layer.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from das_core.training.das import DenselyAnchoredSampling
    from das_core.training.losses import Criterion
    from das_core.training.miners import IndicesTuple


class DASDiagnostics:
    """Collects the diagnostics of the steps it measures; ``summary()`` gives an epoch's means."""

    def __init__(self, steps_per_epoch: int = 4) -> None:
        self.steps_per_epoch = steps_per_epoch
        self._values: dict[str, list[float]] = defaultdict(list)
        self._chosen: set[int] = set()
        self._epoch_step = 0
        self._step = 0
        self._written: torch.Tensor | None = None
        # what the bank age of the last step needs: its labels and the DAS they went through
        self._last: tuple[DenselyAnchoredSampling, torch.Tensor] | None = None

    # -- schedule ---------------------------------------------------------------------------
    def start_epoch(self, steps: int) -> None:
        """Measure ``steps_per_epoch`` evenly spaced steps of an epoch of ``steps`` steps."""
        n = min(self.steps_per_epoch, steps)
        self._chosen = set(np.linspace(1, steps, n).round().astype(int).tolist()) if n > 0 else set()
        self._epoch_step = 0
        self._values.clear()

    def measure_now(self) -> bool:
        self._epoch_step += 1
        return self._epoch_step in self._chosen

    def add(self, name: str, value: float) -> None:
        if math.isfinite(value):
            self._values[name].append(value)

    def summary(self) -> dict[str, float]:
        return {k: float(np.mean(v)) for k, v in sorted(self._values.items()) if v}

    # -- bank staleness ---------------------------------------------------------------------
    @torch.no_grad()
    def track_bank(self, das: DenselyAnchoredSampling, labels: torch.Tensor, ptr_before: torch.Tensor) -> None:
        """After DAS updated its banks with ``labels``' batch: stamp the rows written this step.

        A class with ``m`` images in the batch pushes ``m(m-1)`` ordered pairs; the last
        ``min(m(m-1), Z)`` land just before the new write pointer. Below ``Z`` pushes their count
        is the pointer's advance (exact, also when identical images were dropped)."""
        self._step += 1
        z = das.bank_size
        if self._written is None or self._written.shape != das.bank_ptr.shape + (z,):
            self._written = torch.zeros(das.num_classes, z, dtype=torch.long, device=das.bank_ptr.device)
        if not das.use_mts:
            return
        ptr = das.bank_ptr
        labels = labels.long()
        # images per class in the batch (index_add_, not bincount, which syncs with the host on CUDA)
        m = torch.zeros_like(ptr).index_add_(0, labels, torch.ones_like(labels))
        advance = torch.remainder(ptr - ptr_before, z)
        pushed = torch.where(m * (m - 1) >= z, torch.full_like(advance, z), advance)
        slots = torch.arange(z, device=ptr.device)
        back = torch.remainder(ptr.unsqueeze(1) - 1 - slots.unsqueeze(0), z)  # 0 = newest slot
        self._written = torch.where(back < pushed.unsqueeze(1), self._step, self._written)
        self._last = (das, labels)

    @property
    def _age(self) -> torch.Tensor | None:
        """Mean age (steps) of the filled bank rows of the last tracked batch's classes; computed
        only when a measured step asks for it, not on every training step."""
        if self._last is None or self._written is None:
            return None
        das, labels = self._last
        slots = torch.arange(das.bank_size, device=labels.device)
        filled = das.bank_filled.index_select(0, labels)
        valid = slots.unsqueeze(0) < filled.unsqueeze(1)
        age = (self._step - self._written.index_select(0, labels)).float()
        return (age * valid).sum() / valid.sum().clamp_min(1)

    # -- one measured step ------------------------------------------------------------------
    def measure(
        self,
        criterion: Criterion,
        embeddings: torch.Tensor,
        emb_all: torch.Tensor,
        labels_all: torch.Tensor,
        source: torch.Tensor,
        indices: IndicesTuple | None,
        g_das: torch.Tensor,
        g_base: torch.Tensor,
    ) -> None:
        b = embeddings.shape[0]
        self.add("grad_das", float(g_das))
        self.add("grad_baseline", float(g_base))
        if float(g_base) > 0:
            self.add("grad_ratio", float(g_das) / float(g_base))
        with torch.no_grad():
            produced = emb_all[b:].detach()
            own = embeddings.detach().repeat(len(produced) // max(1, b), 1)
            self.add("produced_offset", float(torch.linalg.vector_norm(produced - own, dim=1).mean()))
        if self._age is not None:
            self.add("bank_age_steps", float(self._age))
        if indices is None:
            from pytorch_metric_learning.utils.loss_and_miner_utils import get_all_pairs_indices

            indices = tuple(get_all_pairs_indices(labels_all))
        if len(indices) not in (3, 4):
            return
        involves, own_copy = _tuple_masks(indices, source, b)
        n = int(involves.numel())
        self.add("tuples", float(n))
        if n == 0:
            return
        self.add("share_produced", float(involves.float().mean()))
        self.add("share_own_copy", float(own_copy.float().mean()))
        active = _active_share(criterion.loss, emb_all.detach(), labels_all, indices)
        if active is not None:
            self.add("share_active", active)
        for name, keep in (("real", ~involves), ("produced", involves)):
            subset = _subset(indices, keep)
            loss: torch.Tensor = criterion.loss(emb_all, labels_all, subset)
            self.add(f"loss_{name}", float(loss.detach()))
            from das_core.training.losses import _grad_norm

            self.add(f"grad_{name}_terms", float(_grad_norm(loss, embeddings)))


def _tuple_masks(indices: IndicesTuple, source: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tuple (triplets) or per pair (positive pairs, then negative pairs): involves a
    produced embedding; pairs an embedding with its own copy."""
    if len(indices) == 3:
        a, p, n = indices
        return (a >= b) | (p >= b) | (n >= b), source[a] == source[p]
    a1, p, a2, n = indices
    involves = torch.cat([(a1 >= b) | (p >= b), (a2 >= b) | (n >= b)])
    own = torch.cat([source[a1] == source[p], torch.zeros_like(a2, dtype=torch.bool)])
    return involves, own


def _subset(indices: IndicesTuple, keep: torch.Tensor) -> IndicesTuple:
    if len(indices) == 3:
        return tuple(t[keep] for t in indices)
    a1, p, a2, n = indices
    k_pos, k_neg = keep[: len(a1)], keep[len(a1) :]
    return a1[k_pos], p[k_pos], a2[k_neg], n[k_neg]


@torch.no_grad()
def _active_share(loss: nn.Module, emb: torch.Tensor, labels: torch.Tensor, indices: IndicesTuple) -> float | None:
    """Share of non-zero terms among the loss's per-tuple / per-pair / per-element losses."""
    compute = getattr(loss, "compute_loss", None)
    if compute is None:
        return None
    out: Any = compute(emb, labels, indices, emb, labels)
    nonzero = total = 0
    for part in out.values():
        if part.get("reduction_type") not in ("triplet", "pos_pair", "neg_pair", "element"):
            continue
        losses = part["losses"]
        if isinstance(losses, torch.Tensor) and losses.numel() > 1:
            nonzero += int((losses > 0).sum())
            total += losses.numel()
    return nonzero / total if total else None


@torch.no_grad()
def weight_norms(model: nn.Module) -> dict[str, float]:
    """L2 norms of the trainable weights: ``backbone`` (all of it), ``backbone_last`` (its last
    trainable layer with weights, in module order), ``embed`` (the embedding layer) and ``total``."""

    def norm(params: list[torch.Tensor]) -> float:
        return math.sqrt(sum(float(p.detach().float().pow(2).sum()) for p in params)) if params else 0.0

    out: dict[str, float] = {"total": norm([p for p in model.parameters() if p.requires_grad])}
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        out["backbone"] = norm([p for p in backbone.parameters() if p.requires_grad])
        last = [m for m in backbone.modules() if isinstance(m, nn.Conv2d | nn.Linear) and m.weight.requires_grad]
        if last:
            out["backbone_last"] = norm([last[-1].weight])
    embed = getattr(model, "embed", None)
    if isinstance(embed, nn.Module):
        out["embed"] = norm([p for p in embed.parameters() if p.requires_grad])
    return out


@torch.no_grad()
def das_state(das: DenselyAnchoredSampling) -> dict[str, float]:
    """The state DAS has built up by the end of an epoch (every epoch of a DAS run):

    * ``bank_fill``: mean share of the ``Z`` bank rows filled, over all classes;
    * ``classes_seen``: share of the classes whose frequency recorder has counted anything;
    * ``mask_overlap``: over all pairs of seen classes, the mean share of one class's ``K``
      mask dimensions that the other class's mask also holds (0: the classes scale disjoint
      dimensions, 1: all the same ones). Computed from how many masks hold each dimension,
      ``sum_d c_d (c_d - 1) / 2`` shared dimensions over all pairs, so it costs ``O(C d)``,
      not ``O(C^2 d)`` (SOP has 11,318 classes).
    """
    filled = das.bank_filled.double() / das.bank_size
    seen = das.frequency.sum(dim=1) > 0
    n_seen = int(seen.sum())
    out = {"bank_fill": float(filled.mean()), "classes_seen": n_seen / max(1, das.num_classes)}
    if n_seen >= 2:
        per_dim = das.mask[seen].sum(dim=0).double()  # c_d: masks holding dimension d
        pairs = n_seen * (n_seen - 1) / 2
        out["mask_overlap"] = float((per_dim * (per_dim - 1) / 2).sum()) / (pairs * das.topk)
    return out
