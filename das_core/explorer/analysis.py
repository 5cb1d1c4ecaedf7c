"""The numbers shown next to the map: where to produce from, how much of the space between
real embeddings DAS fills, and how honest the produced points are.

Everything is computed in the original embedding space (exact faiss search), never on the
2-D map: placement on the map pulls produced points onto existing clusters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from das_core.arrays import as_labels, as_matrix
from das_core.retrieval.knn import EXPLORER_KNN

if TYPE_CHECKING:
    from das_core.training.config import TrainConfig
    from das_core.training.das import DenselyAnchoredSampling

DEFAULT_ANCHORS_PER_CLASS = 50


# ---------------------------------------------------------------------------- anchors


def select_anchors(
    labels: np.ndarray,
    per_class: int = DEFAULT_ANCHORS_PER_CLASS,
    *,
    classes: list[int] | np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """The real points DAS produces from on the map: up to ``per_class`` random points of each
    class (all of a smaller class), restricted to ``classes`` when given. Sorted indices; each
    class's draw depends only on ``(seed, class)``, so changing ``classes`` keeps the anchors
    of the classes that stay."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    wanted = np.unique(y) if classes is None else np.unique(np.asarray(classes, dtype=np.int64))
    order = np.argsort(y, kind="stable")
    ys = y[order]
    picks: list[np.ndarray] = []
    for c in wanted:
        lo, hi = np.searchsorted(ys, c, "left"), np.searchsorted(ys, c, "right")
        members = order[lo:hi]
        if len(members) == 0 or per_class == 0:
            continue
        rng = np.random.default_rng([int(seed), int(c)])
        take = min(per_class, len(members))
        picks.append(rng.choice(members, size=take, replace=False))
    if not picks:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(picks)).astype(np.int64)


# ---------------------------------------------------------------------------- gap fill


@dataclass
class GapReference:
    """The gaps between real points of one class, precomputed once per split (they do not
    depend on the produced points): ``midpoints (G, d)``, their class, and ``base (G,)`` the
    distance from each midpoint to its nearest real point of that class."""

    midpoints: np.ndarray
    labels: np.ndarray
    base: np.ndarray
    sources: np.ndarray  # (G,) the real point whose nearest-neighbour gap this is


def gap_reference(real: np.ndarray, labels: np.ndarray, *, anchors: np.ndarray | None = None) -> GapReference:
    """The gap midpoints of ``gap_fill``: for every real point (or only the ``anchors``), the
    midpoint to its nearest real neighbour of the same class, and the distance from that
    midpoint to the nearest real point of the class (the two endpoints included, so it is at
    most half the gap)."""
    x = as_matrix(real, "real")
    y = as_labels(labels, x.shape[0], "labels")
    src = np.arange(x.shape[0]) if anchors is None else np.unique(np.asarray(anchors, dtype=np.int64))
    mids, labs, base, sources = [], [], [], []
    for c in np.unique(y[src]):
        members = np.flatnonzero(y == c)
        if len(members) < 2:
            continue
        q = src[y[src] == c]
        xc = x[members]
        # nearest same-class neighbour other than the point itself (2 neighbours cover the
        # self match; a duplicate of the point may come first, which is a zero-length gap)
        _, idx = EXPLORER_KNN(x[q], xc, 2)
        first_is_self = members[idx[:, 0]] == q
        nb = np.where(first_is_self, idx[:, 1], idx[:, 0])
        m = 0.5 * (x[q] + xc[nb])
        d_mid, _ = EXPLORER_KNN(m, xc, 1)
        half = 0.5 * np.linalg.norm(x[q] - xc[nb], axis=1)
        mids.append(m.astype(np.float32))
        labs.append(np.full(len(q), c, dtype=np.int64))
        base.append(np.minimum(d_mid[:, 0], half).astype(np.float32))
        sources.append(q)
    if not mids:
        d = x.shape[1]
        return GapReference(
            np.zeros((0, d), np.float32),
            np.zeros(0, np.int64),
            np.zeros(0, np.float32),
            np.zeros(0, np.int64),
        )
    return GapReference(
        np.concatenate(mids), np.concatenate(labs), np.concatenate(base), np.concatenate(sources)
    )


def gap_fill(
    real: np.ndarray,
    labels: np.ndarray,
    produced: np.ndarray,
    produced_labels: np.ndarray,
    *,
    anchors: np.ndarray | None = None,
    reference: GapReference | None = None,
) -> dict[str, Any]:
    """Gap fill: how much closer the produced points come to the middle of the gaps between
    neighbouring real embeddings of a class than the real points already are (0 % = no closer,
    100 % = a produced point sits on every gap's midpoint).

    For each real point (or each of ``anchors``: measure around the points you produced from),
    take the midpoint ``m`` to its nearest same-class real neighbour; ``a`` = distance from
    ``m`` to the nearest real point of the class, ``b`` = distance to the nearest real *or
    produced* point of the class (``b <= a``). Gap fill = ``1 − Σb / Σa``, overall and per
    class. Produced copies of real points score exactly 0. ``reference`` (``gap_reference``)
    skips the part that does not depend on the produced points (cache it between slider moves).
    Returns ``{"overall", "per_class": {class: value}, "gaps": G, "mean_gap_distance": mean a}``.
    """
    ref = reference if reference is not None else gap_reference(real, labels, anchors=anchors)
    p = as_matrix(produced, "produced")
    py = as_labels(produced_labels, p.shape[0], "produced_labels")
    b = ref.base.astype(np.float64).copy()
    for c in np.unique(py):
        rows = np.flatnonzero(ref.labels == c)
        if len(rows) == 0:
            continue
        d, _ = EXPLORER_KNN(ref.midpoints[rows], p[py == c], 1)
        b[rows] = np.minimum(b[rows], d[:, 0])
    a = ref.base.astype(np.float64)

    def score(mask: np.ndarray) -> float:
        sa = float(a[mask].sum())
        return 1.0 - float(b[mask].sum()) / sa if sa > 0 else 0.0

    all_rows = np.ones(len(a), dtype=bool)
    return {
        "overall": score(all_rows),
        "per_class": {int(c): score(ref.labels == c) for c in np.unique(ref.labels)},
        "gaps": len(a),
        "mean_gap_distance": float(a.mean()) if len(a) else 0.0,
    }


# ---------------------------------------------------------------------------- honesty


# Up to this many real classes, honesty is one exact search per class (one pass over the
# real points in all); above it (SOP-like splits with thousands of small classes), a k-NN
# search whose neighbours almost always include another class.
_PER_CLASS_MAX = 64


def _nearest_own_other(
    points: np.ndarray,
    point_labels: np.ndarray,
    real: np.ndarray,
    labels: np.ndarray,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per point: distance to the nearest real point of its own class, to the nearest real
    point of another class, and that other point's class (``exclude[i]``: a real index that
    does not count for point ``i``, e.g. itself). Exact."""
    classes = np.unique(labels)
    if len(classes) > _PER_CLASS_MAX:
        return _nearest_own_other_topk(points, point_labels, real, labels, exclude)
    m = points.shape[0]
    nearest = np.full((m, len(classes)), np.inf, np.float32)  # (M, C) nearest real of each class
    rows = np.arange(m)
    for j, c in enumerate(classes):
        members = np.flatnonzero(labels == c)
        d, i = EXPLORER_KNN(points, real[members], 1 if exclude is None else 2)
        col = np.zeros(m, dtype=np.int64)
        if exclude is not None:
            col = (members[i[:, 0]] == exclude).astype(np.int64)
        ok = col < d.shape[1]
        nearest[rows[ok], j] = d[rows[ok], col[ok]]
    pos = np.searchsorted(classes, point_labels).clip(0, max(0, len(classes) - 1))
    known = (classes[pos] == point_labels) if len(classes) else np.zeros(m, dtype=bool)
    own = np.full(m, np.inf, np.float32)
    own[known] = nearest[rows[known], pos[known]]
    others = nearest.copy()
    others[rows[known], pos[known]] = np.inf
    if len(classes):
        j_other = others.argmin(axis=1)
        other = others[rows, j_other]
        other_label = np.where(np.isfinite(other), classes[j_other], -1).astype(np.int64)
    else:
        other, other_label = np.full(m, np.inf, np.float32), np.full(m, -1, np.int64)
    return own, other.astype(np.float32), other_label


def _nearest_own_other_topk(
    points: np.ndarray,
    point_labels: np.ndarray,
    real: np.ndarray,
    labels: np.ndarray,
    exclude: np.ndarray | None = None,
    k0: int = 16,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_nearest_own_other`` for many classes: one search of the ``k0`` nearest real points,
    then an exact per-class search for the points whose neighbours are all of one kind."""
    m, n = points.shape[0], real.shape[0]
    own = np.full(m, np.inf, np.float32)
    other = np.full(m, np.inf, np.float32)
    other_label = np.full(m, -1, np.int64)
    if m == 0 or n == 0:
        return own, other, other_label
    k = min(n, k0 + (1 if exclude is not None else 0))
    dist, idx = EXPLORER_KNN(points, real, k)
    valid = np.ones(idx.shape, dtype=bool) if exclude is None else idx != exclude[:, None]
    same = labels[idx] == point_labels[:, None]
    own_hit = same & valid
    other_hit = ~same & valid
    has_own, has_other = own_hit.any(axis=1), other_hit.any(axis=1)
    j_own, j_other = own_hit.argmax(axis=1), other_hit.argmax(axis=1)
    rows = np.arange(m)
    own[has_own] = dist[rows, j_own][has_own]
    other[has_other] = dist[rows, j_other][has_other]
    other_label[has_other] = labels[idx[rows, j_other]][has_other]
    # points whose k nearest neighbours are all of one kind (common for "other" in a good
    # embedding): one exact search per class against that class (or its complement)
    for c in np.unique(point_labels[~has_own | ~has_other]):
        for missing, in_class in ((~has_own, True), (~has_other, False)):
            sel = np.flatnonzero(missing & (point_labels == c))
            pool = np.flatnonzero((labels == c) == in_class)
            if len(sel) == 0 or len(pool) == 0:
                continue
            d, j = EXPLORER_KNN(points[sel], real[pool], 1 if exclude is None else 2)
            col = np.zeros(len(sel), dtype=np.int64)
            if exclude is not None:
                col = (pool[j[:, 0]] == exclude[sel]).astype(np.int64)
                ok = col < j.shape[1]
                sel, d, j, col = sel[ok], d[ok], j[ok], col[ok]
            rows = np.arange(len(sel))
            if in_class:
                own[sel] = d[rows, col]
            else:
                other[sel] = d[rows, col]
                other_label[sel] = labels[pool[j[rows, col]]]
    return own, other, other_label


def _honesty_summary(own: np.ndarray, other: np.ndarray, lab: np.ndarray) -> dict[str, Any]:
    ok = np.isfinite(own) & np.isfinite(other)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(ok, own / np.maximum(other, 1e-12), np.nan)

    def summ(mask: np.ndarray) -> dict[str, Any]:
        m = mask & ok
        return {
            "n": int(mask.sum()),
            "fraction_own_closer": float((own[m] < other[m]).mean()) if m.any() else float("nan"),
            "median_ratio": float(np.median(ratio[m])) if m.any() else float("nan"),
        }

    return {
        **summ(np.ones(len(own), dtype=bool)),
        "ratio": ratio.astype(np.float32),
        "per_class": {int(c): summ(lab == c) for c in np.unique(lab)},
    }


def produced_honesty(
    real: np.ndarray,
    labels: np.ndarray,
    produced: np.ndarray,
    produced_labels: np.ndarray,
    *,
    produced_from: np.ndarray | None = None,
    anchors: np.ndarray | None = None,
) -> dict[str, Any]:
    """Honesty of produced points: the share of produced points that are closer to a real
    point of their own class than to any real point of another class, measured in the
    original embedding space (the map's placement can make them look better than they are).

    Per produced point: ``own_distance``, ``other_distance`` (nearest real point of any other
    class), ``other_class`` and ``ratio`` = own / other (< 1 is on the right side). Summary:
    ``fraction_own_closer``, ``median_ratio``, ``n`` and ``per_class`` (class → the same three).

    ``produced_from`` (per produced point, the index of the real anchor it was produced from;
    for ``das.produce(emb[anchors], …)`` with ``T`` rounds, ``np.tile(anchors, T)``) leaves
    each point's own anchor out of its own-class distance: otherwise a point produced next to
    its anchor is honest by construction. ``anchors`` (indices of the real points produced
    from) adds ``anchors``: the same summary for those real points, each without itself: the
    baseline to compare with.
    """
    x = as_matrix(real, "real")
    y = as_labels(labels, x.shape[0], "labels")
    p = as_matrix(produced, "produced")
    py = as_labels(produced_labels, p.shape[0], "produced_labels")
    if p.shape[0] and p.shape[1] != x.shape[1]:
        raise ValueError(f"produced embeddings are {p.shape[1]}-d but the real ones are {x.shape[1]}-d")
    src = None if produced_from is None else as_labels(produced_from, p.shape[0], "produced_from")
    own, other, other_label = _nearest_own_other(p, py, x, y, exclude=src)
    out = _honesty_summary(own, other, py)
    out.update(own_distance=own, other_distance=other, other_class=other_label)
    if anchors is not None:
        a = np.asarray(anchors, dtype=np.int64)
        a_own, a_other, _ = _nearest_own_other(x[a], y[a], x, y, exclude=a)
        base = _honesty_summary(a_own, a_other, y[a])
        base.pop("ratio")
        out["anchors"] = base
    return out


# ---------------------------------------------------------------------------- DAS state


def produce_for_anchors(
    das: DenselyAnchoredSampling | None, embeddings: np.ndarray, labels: np.ndarray, anchors: np.ndarray, *,
    r_s: float, r_b: float, rounds: int, topk: int, use_dfs: bool, use_mts: bool, seed: int,
    normalize: bool | None = None, bank_slots: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What DAS (its current state, unchanged) produces from the real points ``anchors``:
    ``(produced (T·A, d) float32, their labels, their anchor ids, their round 1..T)``, row
    ``t·A + i`` from anchor ``anchors[i]``; seeded, so the same call gives the same points. Empty
    arrays without DAS, anchors or halves. ``normalize`` and ``bank_slots`` ``(T, A)`` go to
    ``das.produce`` (a replay of chosen bank rows instead of random ones)."""
    dim = embeddings.shape[1]
    if das is None or len(anchors) == 0 or not (use_dfs or use_mts):
        return (np.zeros((0, dim), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64),
                np.zeros(0, np.int64))
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = das.produce(
        torch.from_numpy(embeddings[anchors]), torch.from_numpy(labels[anchors]),
        r_s=r_s, r_b=r_b, num_produce=rounds, topk=topk, use_dfs=use_dfs, use_mts=use_mts, generator=gen,
        normalize=normalize, bank_slots=None if bank_slots is None else torch.from_numpy(bank_slots),
    )
    produced = out.detach().numpy().astype(np.float32, copy=False)
    return (produced, np.tile(labels[anchors], rounds), np.tile(anchors, rounds),
            np.repeat(np.arange(1, rounds + 1), len(anchors)))


def compute_das_state(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    das_kwargs: dict[str, Any] | None = None,
    batch_size: int,
    samples_per_class: int,
    num_batches: int | None = None,
    seed: int = 0,
) -> DenselyAnchoredSampling:
    """A DAS module whose frequency recorder and banks were filled by feeding ``embeddings``
    in M-per-class batches, as training would (state updates only: nothing is produced).
    For checkpoints trained without DAS and for splits whose classes have no trained state
    (test, validation). When the split has fewer classes than a batch needs, the batch shrinks
    to ``classes × samples_per_class``. ``num_batches`` defaults to one pass (``N // batch``).
    Produce with ``das.produce(...)``, which leaves the state unchanged."""
    import torch

    from das_core.data.sampler import MPerClassBatchSampler
    from das_core.training.das import DenselyAnchoredSampling

    x = as_matrix(embeddings, "embeddings")
    y = as_labels(labels, x.shape[0], "labels")
    das = DenselyAnchoredSampling(num_classes, x.shape[1], **(das_kwargs or {}))
    present = len(np.unique(y))
    if present < 2:
        raise ValueError(f"DAS state needs embeddings of at least 2 classes, got {present}")
    m = int(samples_per_class)
    bs = min(int(batch_size), present * m)
    bs -= bs % m
    sampler = MPerClassBatchSampler(y, bs, m, num_batches=num_batches, seed=seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        for batch in sampler:
            idx = torch.as_tensor(batch, dtype=torch.int64)
            das.update(xt.index_select(0, idx), yt.index_select(0, idx))
    return das.eval()


def class_top_dims(das: DenselyAnchoredSampling, k: int | None = None) -> list[list[int]]:
    """Per class, its ``k`` (default: the module's ``topk``) most frequently activated
    dimensions, most frequent first (ties: lower index first); dimensions never counted are
    left out, so a class with no recorded embedding gets ``[]``."""
    freq = das.frequency.detach().cpu().numpy()
    k = das.topk if k is None else int(k)
    order = np.argsort(-freq, axis=1, kind="stable")[:, :k]
    return [[int(j) for j in row if freq[c, j] > 0] for c, row in enumerate(order)]


def bank_summary(das: DenselyAnchoredSampling, cls: int) -> dict[str, Any]:
    """The memorised transformations of class ``cls``, oldest first: ``transformations``
    ``(filled, d)``, their L2 ``norms``, ``filled`` of ``size`` rows, and ``mean_norm``."""
    rows = das.bank_in_order(int(cls)).detach().cpu().numpy().astype(np.float32)
    norms = np.linalg.norm(rows, axis=1) if len(rows) else np.zeros(0, np.float32)
    return {
        "class": int(cls),
        "filled": int(rows.shape[0]),
        "size": int(das.bank_size),
        "transformations": rows,
        "norms": norms.astype(np.float32),
        "mean_norm": float(norms.mean()) if len(norms) else 0.0,
    }


def preview_shifts(
    das: DenselyAnchoredSampling,
    anchor_embedding: np.ndarray,
    label: int,
    r_b: float,
    *,
    normalize: bool | None = None,
) -> np.ndarray:
    """``(filled, d)``: the anchor shifted by every memorised transformation of its class,
    ``v + r_b · t`` for each filled bank row ``t`` (oldest first), L2-normalised when
    ``normalize`` (default: as the module produces): ``das.produce`` (through
    :func:`produce_for_anchors`) with DFS off, replaying the bank's rows in order. Place them
    with ``place_points``."""
    v = np.asarray(anchor_embedding, dtype=np.float32).reshape(-1)
    if v.shape[0] != das.dim:
        raise ValueError(f"the anchor is {v.shape[0]}-d but DAS is {das.dim}-d")
    slots = das.bank_slots(int(label)).cpu().numpy().astype(np.int64)
    if len(slots) == 0:
        return np.zeros((0, das.dim), np.float32)
    # produce's own MTS shift, replaying every bank row once (DFS off: no scaling, no draws)
    produced, *_ = produce_for_anchors(
        das, v[None, :], np.array([int(label)], np.int64), np.zeros(1, np.int64),
        r_s=das.r_s, r_b=float(r_b), rounds=len(slots), topk=das.topk, use_dfs=False, use_mts=True, seed=0,
        normalize=normalize, bank_slots=slots[:, None],
    )
    return np.ascontiguousarray(produced, dtype=np.float32)


def das_state_for(source: Any, emb_set: Any) -> tuple[DenselyAnchoredSampling | None, str]:
    """The DAS module to produce from on ``emb_set`` under ``source`` (a ``Checkpoint`` or an
    ``EmbeddingsFile``), and a sentence saying where its state comes from: the checkpoint's
    own frequency recorder and banks on its training split, else a state computed from the
    set's embeddings (``compute_das_state`` with the source's DAS settings). ``None`` with
    fewer than two classes."""
    if emb_set.num_classes < 2 or len(np.unique(emb_set.labels)) < 2:
        return None, "DAS needs at least two classes in the split."
    if emb_set.split == "train" and getattr(source, "has_das", False):
        return (source.build_das(),
                "DAS state: the checkpoint's own frequency recorder and banks, as training left them.")
    das = computed_das_state(source.config, emb_set)
    cfg = source.config
    if getattr(source, "external", False):
        why = "An embeddings file holds no DAS state"
        where = "the file's embeddings"
    elif emb_set.split == "train":
        why, where = "This checkpoint was trained without DAS", "this split's embeddings"
    else:
        why = f"The {emb_set.split} classes were never trained on, so they have no trained DAS state"
        where = "this split's embeddings"
    return das, (f"{why}: the state shown was computed by feeding {where} to DAS in "
                 f"{cfg.samples_per_class}-per-class batches, as training would.")


def computed_das_state(cfg: TrainConfig, emb_set: Any) -> DenselyAnchoredSampling:
    """``compute_das_state`` over an ``EmbeddingSet`` with the DAS settings, batch size,
    samples per class and seed of ``cfg``."""
    kwargs = cfg.das_kwargs()
    kwargs["topk"] = min(int(kwargs["topk"]), int(emb_set.embeddings.shape[1]))
    return compute_das_state(
        emb_set.embeddings, emb_set.labels, emb_set.num_classes, das_kwargs=kwargs,
        batch_size=cfg.batch_size, samples_per_class=cfg.samples_per_class, seed=cfg.seed,
    )
