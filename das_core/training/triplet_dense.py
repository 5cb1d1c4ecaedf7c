"""Triplet margin loss on the batch miners' triplets, with fixed shapes (no host synchronisation).

Why this is written by hand: the batch miners (das_core/training/miners.py) choose one
triplet per anchor, but hand pytorch-metric-learning's ``TripletMarginLoss`` index lists of
the anchors that have one (boolean indexing), and PML's reducers filter the per-triplet
losses again (``AvgNonZeroReducer``: ``losses[losses > 0]`` and ``len(...)``). Each of those
has a shape that depends on the data: on CUDA a host synchronisation, while the CPU of a
launch-bound step should be launching the next kernels (issue 9). Here every anchor keeps
its slot, ``(N,)`` vectors with a mask of the triplets that count, and the reduction is a
masked sum divided by the count: a fixed sequence of kernels.

What it gives, against the miner's index lists + PML's loss (tests/test_triplet_dense.py):

* the same triplets: the miner's ``mine`` is the code its ``forward`` runs, with the same
  random draws, so a training run draws the same numbers on either path;
* the same per-triplet losses: the distance matrix is computed by the PML loss's own
  ``distance`` object (``torch.cdist``, squared for the authors' form), the distances are read
  with ``gather`` (PML: advanced indexing; the same entries), then PML's ``margin`` and
  ``relu``, op for op;
* the same gradient, to the bit: the mean's backward gives ``1/k`` to each counted triplet on
  both paths (``k`` the count), the masked-out ones get an exact 0, and each entry of the
  distance matrix receives at most one term (one triplet per anchor, its positive and
  negative are different columns), so the gradient reaching ``cdist``'s backward is the same
  matrix;
* the same value: on the CPU to the bit (the counted losses are summed compacted, the vector
  PML's mean sums; a boolean index, which costs no synchronisation there). On CUDA (the
  fixed-shape path) the same ``k`` terms are summed over ``N`` slots with zeros in the
  others, which the vectorised sum groups differently: at most ``2 (k-1) eps · sum|x|``
  apart (recursive-summation bound of each side, ``eps`` the unit roundoff), i.e. a relative
  ``2 (k-1) eps`` of the mean since every term is >= 0 (float32, N = 448: 5e-5 at worst; an
  ulp or two in practice). The gradient does not depend on that sum: it is the same.

PML's rules are kept: no triplet (or, averaging the non-zero ones, no positive loss) gives a
zero loss with a zero gradient.
"""

from __future__ import annotations

from typing import Any

import torch

from das_core.training.miners import TripletMiner


class DenseTriplet:
    """Triplet margin loss ``[d(a,p) - d(a,n) + margin]_+`` (``d`` PML's distance object, the
    squared one for the authors' form) on ``miner``'s triplet per anchor, averaged over the
    non-zero losses (PML's default ``AvgNonZeroReducer``) or over every mined triplet
    (``MeanReducer``, the authors' form).

    Not an ``nn.Module``: it holds no state of its own (the miner and distance are the
    criterion's), so ``state_dict`` and checkpoints are the same whichever path runs.
    """

    def __init__(
        self,
        miner: TripletMiner,
        distance: Any,
        margin: float,
        nonzero_mean: bool,
        fixed_shape: bool | None = None,
    ) -> None:
        self.miner = miner
        self.distance = distance
        self.margin = float(margin)
        self.nonzero_mean = nonzero_mean
        # How the counted losses are summed: a masked sum over all N slots (no data-dependent
        # shape: the CUDA path), or the compacted vector (the CPU path, PML's value to the
        # bit); None: by the embeddings' device.
        self.fixed_shape = fixed_shape

    def __call__(
        self, embeddings: torch.Tensor, labels: torch.Tensor, source: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.loss_and_triplets(embeddings, labels, source)[0]

    def loss_and_triplets(
        self, embeddings: torch.Tensor, labels: torch.Tensor, source: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss, and per anchor its positive, its negative and whether the triplet is one
        the loss scored (the miner's index lists, as a mask). With ``source`` (row -> the real
        embedding it was produced from), a triplet whose positive is the anchor's own copy is
        dropped, as ``drop_own_copies`` does on the index lists."""
        labels = labels.to(embeddings.device)
        p, n, mined = self.miner.mine(embeddings, labels)
        if source is not None:
            mined = mined & (source != source.gather(0, p))
        # PML's TripletMarginLoss.compute_loss, op for op, on one slot per anchor.
        mat = self.distance(embeddings, embeddings)
        ap = mat.gather(1, p.unsqueeze(1)).squeeze(1)
        an = mat.gather(1, n.unsqueeze(1)).squeeze(1)
        losses = torch.nn.functional.relu(self.distance.margin(ap, an) + self.margin)
        counted = mined & (losses > 0) if self.nonzero_mean else mined
        fixed = embeddings.is_cuda if self.fixed_shape is None else self.fixed_shape
        if fixed:
            total = torch.where(counted, losses, torch.zeros_like(losses)).sum()
        else:
            # The CPU has no host to wait for: sum the counted losses compacted, the vector
            # PML's mean sums, so that the value (and every logged loss) is PML's to the bit.
            total = losses[counted].sum()
        # total is exactly 0 when nothing counts: 0 / 1 is PML's zero loss.
        loss = total / counted.sum(dtype=total.dtype).clamp_min(1)
        return loss, p, n, mined


def dense_triplet(loss: Any, miner: Any) -> DenseTriplet | None:
    """The dense equivalent of PML's triplet ``loss`` on one of our batch ``miner``'s triplets,
    or ``None`` where it would not be exactly equivalent (another loss, miner, distance or
    reducer, swap or smooth variants, an embedding regulariser)."""
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.losses import TripletMarginLoss
    from pytorch_metric_learning.reducers import AvgNonZeroReducer, MeanReducer

    if type(loss) is not TripletMarginLoss or not isinstance(miner, TripletMiner):
        return None
    if loss.swap or loss.smooth_loss or getattr(loss, "embedding_regularizer", None) is not None:
        return None
    if type(loss.distance) is not LpDistance:
        return None
    reducer = loss.reducer
    if type(reducer) is MeanReducer:
        return DenseTriplet(miner, loss.distance, loss.margin, nonzero_mean=False)
    if type(reducer) is AvgNonZeroReducer and reducer.low == 0 and reducer.high is None:
        return DenseTriplet(miner, loss.distance, loss.margin, nonzero_mean=True)
    return None
