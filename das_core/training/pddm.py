"""PDDM: Position-Dependent Deep Metric (Huang, Loy & Tang, NeurIPS 2016), vectorised.

A small learned unit scores a pair of L2-normalised embeddings ``f_i, f_j`` from both
their difference and their absolute position in the embedding space, so that how
"hard" a pair is depends on its neighbourhood rather than on one global Euclidean
distance::

    u  = |f_i − f_j|                  v  = (f_i + f_j) / 2
    u1 = ReLU(W_u · u/‖u‖ + b_u)      v1 = ReLU(W_v · v/‖v‖ + b_v)
    c  = ReLU(W_c · [u1/‖u1‖ ; v1/‖v1‖] + b_c)
    S_ij = W_s · c + b_s              (higher score = more similar)

**Hard quadruplet mining** (per mini-batch): the positive pair with the *lowest* score
``(î, ĵ)``, then for each of its ends the negative with the *highest* score (``k̂`` for
``î``, ``l̂`` for ``ĵ``). With ``num_quadruplets = q > 1`` the ``q`` lowest-scoring
positive pairs are taken, each with its own hardest negatives.

**Double-header hinge** (metric loss, trains the unit and the embedding)::

    E_m = [α + S_îk̂ − S_îĵ]₊ + [α + S_ĵl̂ − S_îĵ]₊

**Embedding loss** on squared Euclidean distances ``D``::

    E_e = [β + D_îĵ − D_îk̂]₊ + [β + D_îĵ − D_ĵl̂]₊

``PDDMLoss`` is the paper's end-to-end objective ``E_m + λ·E_e`` (mean over the mined
quadruplets). ``PDDMMiner`` is the lighter variant "PDDM mining + triplet loss": the
quadruplets become two triplets each for an ordinary triplet loss, and the unit keeps
learning from ``E_m`` (see ``PDDMMiner.mine_with_loss``).

Cost of mining one batch of ``N`` embeddings: the unit is evaluated on the ``P``
same-label pairs (each unordered pair once) and on ``2q × N`` (end, candidate) pairs,
i.e. ``O(P + q·N)`` unit evaluations, never all ``N²`` pairs; evaluations are chunked
so that temporary memory stays bounded. There is no per-sample Python loop; the only
host synchronisation is one ``nonzero`` that enumerates the positive pairs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PDDMLoss",
    "PDDMMiner",
    "PDDMUnit",
    "Quadruplets",
    "embedding_loss",
    "metric_loss",
    "mine_quadruplets",
]

Quadruplets = tuple[Tensor, Tensor, Tensor, Tensor]
"""Index tensors ``(î, ĵ, k̂, l̂)`` of the hard quadruplets, each of shape ``(q,)``, long."""

# Floor of the norms in the unit's normalisations: identical embeddings give u = 0, and
# a unit whose ReLU outputs are all zero gives u1 = 0; both then normalise to 0, not NaN.
_EPS = 1e-6
# Upper bound on (pairs in one chunk) x (dim + hidden) when the unit scores many pairs;
# bounds the unit's temporary memory to some hundreds of MiB of float32.
_CHUNK_ELEMENTS = 1 << 22


def _check_int(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}={value!r} is not allowed: must be an integer >= {lo}")
    return value


def _check_margin(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} is not allowed: must be a finite number >= 0")
    return float(value)


def _normalize(x: Tensor, eps: float) -> Tensor:
    """``x / max(‖x‖, eps)`` along the last dimension, computed in at least float32 (so that
    the floor does not underflow in float16 under autocast); a zero vector stays zero."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    norm: Tensor = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / norm.clamp_min(eps)


class PDDMUnit(nn.Module):
    """The PDDM unit: a learned, position-dependent similarity score of a pair of embeddings.

    ``dim`` is the embedding size ``d``, ``hidden`` the width ``h`` of the unit (``d`` by
    default). Layers, with the paper's names: ``w_u`` (``W_u, b_u``: d → h), ``w_v``
    (``W_v, b_v``: d → h), ``w_c`` (``W_c, b_c``: 2h → h), ``w_s`` (``W_s, b_s``: h → 1).
    The score is symmetric in ``(f_i, f_j)`` because ``u`` and ``v`` are. The unit does not
    re-normalise its inputs (they arrive L2-normalised; DAS with ``normalize=False`` is
    respected); every internal normalisation is floored at ``eps`` so that identical
    embeddings (``u = 0``) give finite scores and gradients.
    """

    def __init__(self, dim: int, hidden: int | None = None, *, eps: float = _EPS) -> None:
        super().__init__()
        self.dim = _check_int("dim", dim, 1)
        self.hidden = self.dim if hidden is None else _check_int("hidden", hidden, 1)
        if not (isinstance(eps, float) and eps > 0):
            raise ValueError(f"eps={eps!r} is not allowed: must be a float > 0")
        self.eps = eps
        h = self.hidden
        self.w_u = nn.Linear(self.dim, h)
        self.w_v = nn.Linear(self.dim, h)
        self.w_c = nn.Linear(2 * h, h)
        self.w_s = nn.Linear(h, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, eps={self.eps:g}"

    def forward(self, fi: Tensor, fj: Tensor) -> Tensor:
        """Scores ``S`` of the row-aligned pairs ``(fi[..., :], fj[..., :])``.

        ``fi`` and ``fj`` have shapes ``(..., d)`` that broadcast; the result has the
        broadcast leading shape (``(N,)`` for two ``(N, d)`` inputs). Higher = more similar.
        """
        if fi.shape[-1] != self.dim or fj.shape[-1] != self.dim:
            raise ValueError(
                f"PDDM unit of dim {self.dim}: got inputs of shapes {tuple(fi.shape)} and {tuple(fj.shape)}"
            )
        dtype = torch.promote_types(torch.promote_types(fi.dtype, fj.dtype), torch.float32)
        fi, fj = fi.to(dtype), fj.to(dtype)
        u = (fi - fj).abs()
        v = (fi + fj) * 0.5
        u1 = F.relu(self.w_u(_normalize(u, self.eps)))
        v1 = F.relu(self.w_v(_normalize(v, self.eps)))
        c = F.relu(self.w_c(torch.cat([_normalize(u1, self.eps), _normalize(v1, self.eps)], dim=-1)))
        score: Tensor = self.w_s(c)
        return score.squeeze(-1)

    def _chunk(self) -> int:
        return max(1, _CHUNK_ELEMENTS // (self.dim + self.hidden))

    def pair_scores(self, x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """Scores ``S[rows[m], cols[m]]`` of selected index pairs of the batch ``x`` (``(N, d)``),
        shape ``rows.shape``; only those pairs are evaluated (in bounded chunks)."""
        if rows.shape != cols.shape:
            raise ValueError(f"rows {tuple(rows.shape)} and cols {tuple(cols.shape)} differ in shape")
        r, c = rows.reshape(-1), cols.reshape(-1)
        step = self._chunk()
        if r.numel() <= step:
            out: Tensor = self(x[r], x[c])
        else:
            out = torch.cat(
                [self(x[a], x[b]) for a, b in zip(torch.split(r, step), torch.split(c, step), strict=True)]
            )
        return out.reshape(rows.shape)

    def score_matrix(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """All scores ``S[a, b]`` between the rows of ``x`` (``(N, d)``) and of ``y`` (``(M, d)``,
        default ``x``): ``(N, M)``. Materialises N·M pairs (chunked); for inspection and tests —
        the miner never calls it."""
        y = x if y is None else y
        if len(x) == 0 or len(y) == 0:
            empty: Tensor = self(x[:, None, :], y[None, :, :])
            return empty
        per = max(1, self._chunk() // len(y))
        return torch.cat([self(xc[:, None, :], y[None, :, :]) for xc in torch.split(x, per)])


def _check_batch(embeddings: Tensor, labels: Tensor, who: str) -> None:
    if embeddings.ndim != 2 or labels.ndim != 1 or len(labels) != len(embeddings):
        raise ValueError(
            f"{who}: expected embeddings (N, d) and labels (N,), got "
            f"{tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )


def _empty_quadruplets(device: torch.device) -> Quadruplets:
    def e() -> Tensor:
        return torch.empty(0, dtype=torch.long, device=device)

    return e(), e(), e(), e()


def mine_quadruplets(
    unit: PDDMUnit, embeddings: Tensor, labels: Tensor, num_quadruplets: int = 1
) -> Quadruplets:
    """Hard quadruplet mining of PDDM in one mini-batch, by the unit's scores.

    Returns ``(î, ĵ, k̂, l̂)``, long tensors of length ``min(q, P)``: the ``q`` positive
    pairs ``î < ĵ`` (each unordered same-label pair considered once) with the lowest
    scores, ascending (ties: the first pair in row-major order), and for each the
    highest-scoring negative of ``î`` (``k̂``) and of ``ĵ`` (``l̂``) (ties: the lowest
    index). Runs under ``no_grad`` on detached embeddings; the losses recompute the scores
    they need with gradients. Cost: ``P + 2q·N`` unit evaluations (``P`` = number of
    positive pairs). A batch with no positive pair or no negative (a single class) gives
    empty tensors.
    """
    _check_batch(embeddings, labels, "PDDM mining")
    q = _check_int("num_quadruplets", num_quadruplets, 1)
    with torch.no_grad():
        x = embeddings.detach()
        device = x.device
        labels = labels.to(device)
        n = len(labels)
        same = labels[:, None] == labels[None, :]
        # A single-class batch has positives but no negative: fold that into the positive mask,
        # so that the one nonzero below is the only host synchronisation.
        has_negative = (labels != labels[:1]).any()
        pos = same.triu(diagonal=1) & has_negative
        pi, pj = pos.nonzero(as_tuple=True)
        if pi.numel() == 0:
            return _empty_quadruplets(device)
        s_pos = unit.pair_scores(x, pi, pj)
        order = torch.sort(s_pos, stable=True).indices[: min(q, pi.numel())]
        i_hat, j_hat = pi[order], pj[order]
        m = len(order)
        ends = torch.cat([i_hat, j_hat])  # (2m,)
        rows = ends.repeat_interleave(n)
        cols = torch.arange(n, device=device).repeat(2 * m)
        s_ends = unit.pair_scores(x, rows, cols).view(2 * m, n)
        s_ends = s_ends.masked_fill(same[ends], float("-inf"))
        hardest = s_ends.argmax(dim=1)
        return i_hat, j_hat, hardest[:m], hardest[m:]


def metric_loss(unit: PDDMUnit, embeddings: Tensor, quads: Quadruplets, alpha: float) -> Tensor:
    """Double-header hinge per quadruplet, ``E_m = [α + S_îk̂ − S_îĵ]₊ + [α + S_ĵl̂ − S_îĵ]₊``
    (shape ``(q,)``, float32); gradients reach the unit and, unless ``embeddings`` is
    detached, the embeddings."""
    i_hat, j_hat, k_hat, l_hat = quads
    rows = torch.cat([i_hat, i_hat, j_hat])
    cols = torch.cat([j_hat, k_hat, l_hat])
    s = unit.pair_scores(embeddings, rows, cols).float().view(3, -1)
    s_ij, s_ik, s_jl = s[0], s[1], s[2]
    return F.relu(alpha + s_ik - s_ij) + F.relu(alpha + s_jl - s_ij)


def embedding_loss(embeddings: Tensor, quads: Quadruplets, beta: float) -> Tensor:
    """PDDM's embedding loss per quadruplet on squared Euclidean distances,
    ``E_e = [β + D_îĵ − D_îk̂]₊ + [β + D_îĵ − D_ĵl̂]₊`` (shape ``(q,)``, float32)."""
    i_hat, j_hat, k_hat, l_hat = quads
    x = embeddings.float()

    def d2(a: Tensor, b: Tensor) -> Tensor:
        return (x[a] - x[b]).pow(2).sum(dim=-1)

    d_ij = d2(i_hat, j_hat)
    return F.relu(beta + d_ij - d2(i_hat, k_hat)) + F.relu(beta + d_ij - d2(j_hat, l_hat))


class PDDMLoss(nn.Module):
    """PDDM's end-to-end objective: hard quadruplet mining by the unit, then
    ``mean over quadruplets of E_m + λ·E_e`` (double-header hinge on the scores plus the
    embedding hinge on squared distances). Gradients reach both the unit (``self.unit``,
    its own parameter group "pddm" in ``Criterion.param_groups``) and the embeddings.

    A batch without a hard quadruplet (one class only, or no two samples of a class) gives
    ``embeddings.sum() * 0``: zero, still attached to the graph.
    """

    def __init__(
        self,
        dim: int,
        *,
        alpha: float = 0.5,
        beta: float = 1.0,
        lam: float = 0.5,
        num_quadruplets: int = 1,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        self.alpha = _check_margin("alpha", alpha)
        self.beta = _check_margin("beta", beta)
        self.lam = _check_margin("lam", lam)
        self.num_quadruplets = _check_int("num_quadruplets", num_quadruplets, 1)
        self.unit = PDDMUnit(dim, hidden)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, beta={self.beta:g}, lam={self.lam:g}, num_quadruplets={self.num_quadruplets}"

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: object = None) -> Tensor:
        """The loss of one batch. ``indices_tuple`` is accepted only for interface
        compatibility with pytorch-metric-learning losses and is ignored: PDDM mines its own
        hard quadruplets."""
        quads = mine_quadruplets(self.unit, embeddings, labels, self.num_quadruplets)
        if quads[0].numel() == 0:
            return embeddings.sum() * 0
        e_m = metric_loss(self.unit, embeddings, quads, self.alpha)
        e_e = embedding_loss(embeddings, quads, self.beta)
        return (e_m + self.lam * e_e).mean()


class PDDMMiner(nn.Module):
    """The lighter variant "PDDM mining + triplet loss".

    Mines hard quadruplets with its unit (``self.unit``) and turns each ``(î, ĵ, k̂, l̂)``
    into the two triplets ``(î, ĵ, k̂)`` and ``(ĵ, î, l̂)`` (quadruplet ``m`` gives triplets
    ``2m`` and ``2m + 1``) in pytorch-metric-learning's ``(anchors, positives, negatives)``
    format. ``mine_with_loss`` also returns the double-header hinge ``E_m`` so that the unit
    keeps learning (``Criterion`` adds it to the triplet loss).

    Design choice: in this variant ``E_m`` is computed on *detached* embeddings, so its
    gradient trains the unit only; the embedding is trained by the triplet loss alone (as
    with any other miner), and ``α`` is the only PDDM hyper-parameter that matters here.
    """

    def __init__(
        self, dim: int, *, alpha: float = 0.5, num_quadruplets: int = 1, hidden: int | None = None
    ) -> None:
        super().__init__()
        self.alpha = _check_margin("alpha", alpha)
        self.num_quadruplets = _check_int("num_quadruplets", num_quadruplets, 1)
        self.unit = PDDMUnit(dim, hidden)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, num_quadruplets={self.num_quadruplets}"

    @staticmethod
    def _triplets(quads: Quadruplets) -> tuple[Tensor, Tensor, Tensor]:
        i_hat, j_hat, k_hat, l_hat = quads
        anchors = torch.stack([i_hat, j_hat], dim=1).reshape(-1)
        positives = torch.stack([j_hat, i_hat], dim=1).reshape(-1)
        negatives = torch.stack([k_hat, l_hat], dim=1).reshape(-1)
        return anchors, positives, negatives

    def forward(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Triplets ``(anchors, positives, negatives)`` (long, length ``2·min(q, P)``) of the
        mined hard quadruplets; empty for a batch without one."""
        return self._triplets(mine_quadruplets(self.unit, embeddings, labels, self.num_quadruplets))

    def mine_with_loss(
        self, embeddings: Tensor, labels: Tensor
    ) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
        """The same triplets as ``forward`` plus the unit's metric loss ``E_m`` (mean over the
        quadruplets, float32 scalar), computed on detached embeddings: it trains the unit and
        sends no gradient to the embeddings. Without a quadruplet the loss is a constant 0."""
        quads = mine_quadruplets(self.unit, embeddings, labels, self.num_quadruplets)
        triplets = self._triplets(quads)
        if quads[0].numel() == 0:
            return triplets, torch.zeros((), dtype=torch.float32, device=embeddings.device)
        return triplets, metric_loss(self.unit, embeddings.detach(), quads, self.alpha).mean()
