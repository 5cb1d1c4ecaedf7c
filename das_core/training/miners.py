"""Tuple miners run on the (DAS-enlarged) batch.

``random``, ``semi-hard``, ``soft-hard`` and ``distance-weighted`` follow the batch miners of
Roth et al.'s Revisiting-DML framework, on which the DAS code is built: one triplet
``(anchor, positive, negative)`` per anchor. They are written here, vectorised over the
whole batch, instead of taken from pytorch-metric-learning because PML's
``TripletMarginMiner`` enumerates every triplet of the batch (O(N³) memory and time): on a
DAS batch of (1+T)·B embeddings that made a training step 2.8x slower than a plain one.
These cost O(N²). ``multi-similarity`` is PML's ``MultiSimilarityMiner`` (already O(N²)).

A miner is called as ``miner(embeddings, labels)`` and returns an ``indices_tuple`` of
pytorch-metric-learning: ``(anchors, positives, negatives)`` or, for pair miners,
``(anchors1, positives, anchors2, negatives)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

IndicesTuple = tuple[torch.Tensor, ...]


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix of the rows of ``x`` (float32, exact zeros on the diagonal)."""
    x = x.float()
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.t())).clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    return d2.sqrt()


def _random_choice(mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each row, a uniformly random column where ``mask`` is true (arbitrary where none)."""
    noise = torch.rand(mask.shape, device=mask.device, generator=generator)
    return torch.where(mask, noise, torch.full_like(noise, -1.0)).argmax(dim=1)


def _choice_or_fallback(
    preferred: torch.Tensor, fallback: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random column from ``preferred`` where that row has any, else from ``fallback``."""
    use_pref = preferred.any(dim=1, keepdim=True)
    return _random_choice(torch.where(use_pref, preferred, fallback), generator)


class TripletMiner(nn.Module):
    """Base class: validates inputs, computes masks and distances once, then ``select``.

    ``mine`` gives the fixed-shape result (one positive and one negative column per anchor, and
    which anchors have both), ``forward`` the index lists of the anchors that do. ``mine`` has
    no data-dependent shape (no host synchronisation on CUDA); the dense triplet criterion
    (das_core/training/triplet_dense.py) uses it, and both draw the same random numbers."""

    name = "base"

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> IndicesTuple:
        p, n, valid = self.mine(embeddings, labels)
        anchors = torch.arange(len(labels), device=labels.device)[valid]
        return anchors, p[valid], n[valid]

    def mine(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per anchor (row): the positive and negative columns chosen, and ``valid`` (the anchor
        has a positive and a negative; the columns of other anchors are arbitrary)."""
        if embeddings.ndim != 2 or labels.ndim != 1 or len(labels) != len(embeddings):
            raise ValueError(
                f"{self.name} miner: expected embeddings (N, d) and labels (N,), got "
                f"{tuple(embeddings.shape)} and {tuple(labels.shape)}"
            )
        with torch.no_grad():
            x = embeddings.detach()
            same = labels[:, None] == labels[None, :]
            eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
            pos = same & ~eye
            neg = ~same
            dist = pairwise_distances(x)
            p, n = self.select(dist, pos, neg, x.shape[1])
            valid = pos.any(dim=1) & neg.any(dim=1)
            return p, n, valid

    def select(
        self, dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class RandomMiner(TripletMiner):
    """A random positive and a random negative per anchor."""

    name = "random"

    def select(
        self, dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _random_choice(pos), _random_choice(neg)


class SemiHardMiner(TripletMiner):
    """A random positive p; a random negative n with d(a,p) < d(a,n) < d(a,p) + margin
    (semi-hard), or a random negative when there is none."""

    name = "semi-hard"

    def __init__(self, margin: float) -> None:
        super().__init__()
        self.margin = margin

    def select(
        self, dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = _random_choice(pos)
        d_ap = dist.gather(1, p[:, None])
        semi = neg & (dist > d_ap) & (dist < d_ap + self.margin)
        return p, _choice_or_fallback(semi, neg)


class SoftHardMiner(TripletMiner):
    """A random positive farther than the closest negative and a random negative closer than
    the farthest positive (each falling back to any positive/negative)."""

    name = "soft-hard"

    def select(
        self, dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inf = torch.full_like(dist, math.inf)
        hardest_pos = torch.where(pos, dist, -inf).amax(dim=1, keepdim=True)
        closest_neg = torch.where(neg, dist, inf).amin(dim=1, keepdim=True)
        hard_pos = pos & (dist > closest_neg)
        hard_neg = neg & (dist < hardest_pos)
        return _choice_or_fallback(hard_pos, pos), _choice_or_fallback(hard_neg, neg)


class DistanceWeightedMiner(TripletMiner):
    """Wu et al. (2017): a random positive; a negative drawn with probability proportional to
    the inverse density ``q(d)^-1`` of pairwise distances on the unit sphere in ``dim``
    dimensions, ``log q(d) = (dim-2) log d + (dim-3)/2 log(1 - d²/4)``, with distances
    clipped below at ``cutoff`` (0.5 in the paper)."""

    name = "distance-weighted"

    def __init__(self, cutoff: float = 0.5) -> None:
        super().__init__()
        self.cutoff = cutoff

    def select(
        self, dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        d = dist.clamp(min=self.cutoff, max=2.0 - 1e-3).double()
        log_inv_q = (2.0 - dim) * torch.log(d) - ((dim - 3) / 2.0) * torch.log1p(-0.25 * d * d)
        log_inv_q = torch.where(neg, log_inv_q, torch.full_like(log_inv_q, -math.inf))
        # Gumbel-max: one draw per row from softmax(log_inv_q), fully vectorised.
        u = torch.rand(log_inv_q.shape, device=dist.device, dtype=torch.float64).clamp_(1e-12, 1.0)
        n = (log_inv_q - torch.log(-torch.log(u))).argmax(dim=1)
        return _random_choice(pos), n


def build_miner(
    name: str, *, margin: float = 0.2, ms_epsilon: float = 0.1, dw_cutoff: float = 0.5
) -> Callable[[torch.Tensor, torch.Tensor], IndicesTuple] | None:
    """The miner called ``name`` (``none`` gives ``None``: the loss uses every tuple)."""
    if name == "none":
        return None
    if name == "random":
        return RandomMiner()
    if name == "semi-hard":
        return SemiHardMiner(margin)
    if name == "soft-hard":
        return SoftHardMiner()
    if name == "distance-weighted":
        return DistanceWeightedMiner(dw_cutoff)
    if name == "multi-similarity":
        from pytorch_metric_learning.miners import MultiSimilarityMiner

        miner: Callable[[torch.Tensor, torch.Tensor], IndicesTuple] = MultiSimilarityMiner(epsilon=ms_epsilon)
        return miner
    if name == "pddm":
        raise ValueError("the pddm miner is built with its PDDM unit by das_core.training.losses.build_criterion")
    raise ValueError(f"unknown miner {name!r}; valid miners are: {', '.join(MINER_NAMES)}")


MINER_NAMES = ("none", "random", "semi-hard", "soft-hard", "distance-weighted", "multi-similarity", "pddm")
