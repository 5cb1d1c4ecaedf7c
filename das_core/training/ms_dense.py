"""Multi-similarity mining and loss as dense, fixed-shape (N x N) masked operations.

Why this is written by hand: pytorch-metric-learning's ``MultiSimilarityMiner`` and
``MultiSimilarityLoss`` pass the mined pairs around as index lists, whose lengths depend on
the data: ``torch.where`` (a ``nonzero``) to list the pairs, ``len(...)`` checks on them,
index assignment to turn them back into masks and a ``torch.any`` asserted in Python. On
CUDA each of those is a host synchronisation (11 per ResNet-50 training step, issue 9): the
CPU, already the bottleneck of a launch-bound step, waits for the GPU and the GPU then idles
while the next kernels are launched. Here the same pairs are kept as boolean masks and the
same per-anchor terms are computed with PML's own ``CosineSimilarity`` and ``logsumexp``, so
the criterion is a fixed sequence of kernels with no data-dependent shape and no ``.item()``.

It gives PML's value and gradient exactly (tests/test_ms_dense.py):

* mining (``MultiSimilarityMiner``, cosine similarity ``s``, margin ``epsilon``): a positive
  pair ``(a, p)`` is kept when ``s_ap - epsilon < max_n s_an``, a negative pair ``(a, n)`` when
  ``s_an + epsilon > min_p s_ap`` (the hardest opposite pair of the anchor; self-pairs are
  never pairs);
* loss (``MultiSimilarityLoss``): per anchor ``1/alpha log(1 + sum_pos exp(-alpha (s - base)))
  + 1/beta log(1 + sum_neg exp(beta (s - base)))`` (0 for an anchor without such pairs),
  averaged over all anchors (PML's default ``MeanReducer``);
* PML returns a zero loss (zero gradient) when at most one positive and at most one negative
  pair are left; that rule is kept, decided on the device.
"""

from __future__ import annotations

from typing import Any

import torch


class DenseMultiSimilarity:
    """Multi-similarity loss, optionally with multi-similarity mining, on dense masks.

    Not an ``nn.Module``: it holds no state, so the criterion's ``state_dict`` (and the
    checkpoints) are the same whichever implementation runs.
    """

    def __init__(self, alpha: float, beta: float, base: float, epsilon: float | None) -> None:
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.base = float(base)
        self.epsilon = None if epsilon is None else float(epsilon)

    def masks(
        self, sim: torch.Tensor, labels: torch.Tensor, source: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean (N, N) masks of the positive and negative pairs the loss scores: all pairs
        (no miner) or the mined ones; positive pairs of an embedding with its own produced
        copy are dropped when ``source`` (row -> real embedding it came from) is given."""
        with torch.no_grad():
            same = labels[:, None] == labels[None, :]
            eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
            pos = same & ~eye
            neg = ~same
            if self.epsilon is not None:
                s = sim.detach()
                # PML's miner fills the ignored entries with the dtype's extremes; an anchor
                # without negatives (positives) keeps no positive (negative) pair either way.
                hardest_neg = torch.where(neg, s, torch.finfo(s.dtype).min).amax(dim=1, keepdim=True)
                hardest_pos = torch.where(pos, s, torch.finfo(s.dtype).max).amin(dim=1, keepdim=True)
                pos = pos & (s - self.epsilon < hardest_neg)
                neg = neg & (s + self.epsilon > hardest_pos)
            if source is not None:
                pos = pos & (source[:, None] != source[None, :])
        return pos, neg

    def __call__(
        self, embeddings: torch.Tensor, labels: torch.Tensor, source: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.loss_and_pairs(embeddings, labels, source)[0]

    def loss_and_pairs(
        self, embeddings: torch.Tensor, labels: torch.Tensor, source: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss and the (N, N) masks of the positive and negative pairs it scored."""
        from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

        if embeddings.ndim != 2 or labels.ndim != 1 or len(labels) != len(embeddings):
            raise ValueError(
                f"multi-similarity loss: expected embeddings (N, d) and labels (N,), got "
                f"{tuple(embeddings.shape)} and {tuple(labels.shape)}"
            )
        labels = labels.to(embeddings.device)
        # PML's CosineSimilarity(embeddings, ref_emb=embeddings), op for op: query and
        # reference are normalised separately, so the backward adds up the same two paths.
        query = torch.nn.functional.normalize(embeddings, p=2, dim=1)
        ref = torch.nn.functional.normalize(embeddings, p=2, dim=1)
        sim = torch.matmul(query, ref.t())
        pos, neg = self.masks(sim, labels, source)
        # PML's MultiSimilarityLoss._compute_loss, op for op (so the values agree to the bit).
        pos_loss = (1.0 / self.alpha) * lmu.logsumexp(self.alpha * (self.base - sim), keep_mask=pos, add_one=True)
        neg_loss = (1.0 / self.beta) * lmu.logsumexp(self.beta * (sim - self.base), keep_mask=neg, add_one=True)
        loss = (pos_loss + neg_loss).mean()
        degenerate = (pos.sum() <= 1) & (neg.sum() <= 1)
        out: torch.Tensor = torch.where(degenerate, torch.zeros_like(loss), loss)
        return out, pos, neg


def dense_multi_similarity(loss: Any, miner: Any) -> DenseMultiSimilarity | None:
    """The dense equivalent of PML's ``loss`` scored on ``miner``'s pairs, or ``None`` where
    it would not be exactly equivalent (another loss, miner, distance or reducer, or an
    embedding regulariser)."""
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.losses import MultiSimilarityLoss
    from pytorch_metric_learning.miners import MultiSimilarityMiner
    from pytorch_metric_learning.reducers import MeanReducer

    if type(loss) is not MultiSimilarityLoss or type(loss.distance) is not CosineSimilarity:
        return None
    if type(loss.reducer) is not MeanReducer or getattr(loss, "embedding_regularizer", None) is not None:
        return None
    if miner is None:
        return DenseMultiSimilarity(loss.alpha, loss.beta, loss.base, None)
    if type(miner) is not MultiSimilarityMiner or type(miner.distance) is not CosineSimilarity:
        return None
    return DenseMultiSimilarity(loss.alpha, loss.beta, loss.base, miner.epsilon)
