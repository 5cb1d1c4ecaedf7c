"""Retrieval and clustering metrics of deep metric learning.

``evaluate_embeddings`` scores an embedded, labelled set against itself (leave-one-out):

- ``R@k``: fraction of queries with at least one same-label item among their k nearest neighbours.
- ``MAP@R`` (Musgrave et al. 2020, "A Metric Learning Reality Check"): mean over queries of
  ``(1/R) * sum_{i<=R} P(i) * rel(i)``, where R is the number of other items of the query's class
  and P(i) the precision among the first i neighbours.
- ``RP`` (R-precision): mean over queries of (same-label items among the first R neighbours) / R.
- ``NMI``: normalised mutual information between the labels and a k-means clustering with as many
  clusters as classes.
- ``F1``: pair-counting F1 of that same clustering against the labels.

Every item is a query and the gallery is every *other* item: the query is left out by its index,
never by dropping the first neighbour (a duplicate may tie with it at distance 0 and come first).
Distances are Euclidean; ties are broken by the lower gallery index on every code path. Queries
whose class has no other item (R = 0) are left out of R@k, MAP@R and RP, as in
pytorch-metric-learning's ``AccuracyCalculator``.

Nearest neighbours come from the library's one exact kNN (``das_core.retrieval.knn.ExactKnn``:
faiss for few neighbours, a chunked torch matmul plus an exact partial sort for many, as MAP@R
on classes of thousands needs; on a CUDA device the torch path runs there). k-means uses faiss
for its assignment step; ``evaluate_embeddings`` reads its first assignment (each point to the nearest
seed point) off the kNN lists it has already searched. Nothing of size N x N is held in memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from sklearn.metrics import normalized_mutual_info_score

from das_core.arrays import ArrayInput, FloatArray, IndexArray, as_labels, as_matrix, check_positive_int
from das_core.retrieval import knn
from das_core.retrieval.knn import L2_KNN, Backend, ExactKnn
from das_core.runtime import DeviceLike, thread_limit

__all__ = ["evaluate_embeddings", "kmeans_labels", "nmi", "pair_f1"]

_MAX_POINTS_PER_CENTROID = 256  # k-means trains on at most this many rows per cluster (faiss's default)
_SPLIT_EPS = 1.0 / 1024.0  # faiss's perturbation when it splits a cluster to refill an empty one

# --------------------------------------------------------------------------- input checks


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    out = tuple(ks)
    if not out:
        raise ValueError("ks must name at least one k")
    for k in out:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"every k in ks must be an integer >= 1, got {k!r}")
    return tuple(int(k) for k in out)


# --------------------------------------------------------------------------- clustering


def _nearest_centroid(x: FloatArray, centroids: FloatArray) -> tuple[FloatArray, IndexArray]:
    """Squared distance to and id of the nearest centroid of every row (faiss, ties: lower id)."""
    dist, idx = L2_KNN.index(centroids).search_squared(x, 1, None)
    return dist[:, 0], idx[:, 0]


def _reassign(
    x: FloatArray, centroids: FloatArray, assign: IndexArray, dist: FloatArray, moved: npt.NDArray[np.bool_]
) -> tuple[FloatArray, IndexArray]:
    """Nearest centroid of every row, knowing it was ``assign`` (at ``dist``) before the centroids
    flagged in ``moved`` changed and the others stayed bit-identical: rows of a moved cluster are
    searched against all centroids; for the others the old nearest is still the best unmoved one,
    so only the moved centroids can beat it. A full search when many moved."""
    ids = np.nonzero(moved)[0]
    if ids.size == 0:
        return dist, assign
    if 3 * ids.size > centroids.shape[0]:
        return _nearest_centroid(x, centroids)
    d_moved, i_moved = _nearest_centroid(x, centroids[ids])
    cand = ids[i_moved]
    better = (d_moved < dist) | ((d_moved == dist) & (cand < assign))
    new_dist, new_assign = np.where(better, d_moved, dist), np.where(better, cand, assign)
    own = np.nonzero(moved[assign])[0]
    if own.size:
        new_dist[own], new_assign[own] = _nearest_centroid(x[own], centroids)
    return new_dist, new_assign


def kmeans_labels(
    x: ArrayInput,
    n_clusters: int,
    seed: int = 0,
    *,
    niter: int = 20,
    max_points_per_centroid: int = _MAX_POINTS_PER_CENTROID,
) -> IndexArray:
    """Lloyd's k-means; returns the cluster id (0..n_clusters-1) of every row, deterministically.

    Init: ``n_clusters`` distinct rows drawn with ``seed``, and every point assigned to its
    nearest (faiss ``IndexFlatL2``, ties to the lower id). Each of at most ``niter`` iterations
    moves each centroid to its points' mean (an empty cluster is refilled by splitting a populated
    one, as faiss does) and re-assigns every point; it stops early at a fixed point (no point
    changes cluster and none is empty: more iterations would change nothing). Re-assignment only
    re-examines what can change: when few centroids moved, points compare their distance to
    their unmoved centroid with the moved ones only. As faiss does, the centroids are trained on
    at most ``max_points_per_centroid * n_clusters`` seeded random rows; the returned labels
    always assign every row to the final centroids.
    """
    arr = as_matrix(x, "x", allow_empty=False)
    n = arr.shape[0]
    if (
        isinstance(n_clusters, bool)
        or not isinstance(n_clusters, int | np.integer)
        or not 1 <= n_clusters <= n
    ):
        raise ValueError(f"n_clusters must be an integer in [1, {n}], got {n_clusters!r}")
    check_positive_int(niter, "niter")
    check_positive_int(max_points_per_centroid, "max_points_per_centroid")
    n_clusters = int(n_clusters)
    if n_clusters == 1:
        return np.zeros(n, dtype=np.int64)
    if n_clusters == n:
        return np.arange(n, dtype=np.int64)
    rng, train, seeds = _kmeans_plan(n, n_clusters, seed, max_points_per_centroid)
    xt = arr if train is None else arr[train]
    centroids = xt[seeds].copy()
    _, assign = _nearest_centroid(xt, centroids)
    centroids, assign = _lloyd(xt, centroids, assign, rng, niter)
    return assign if train is None else _nearest_centroid(arr, centroids)[1]


def _kmeans_plan(
    n: int, n_clusters: int, seed: int, max_points_per_centroid: int
) -> tuple[np.random.Generator, IndexArray | None, IndexArray]:
    """The seeded draws of kmeans_labels: (rng to go on with, training rows or None for all,
    seed rows within the training rows, ascending, so centroid ids follow row order)."""
    rng = np.random.default_rng(seed)
    train = None
    if n > max_points_per_centroid * n_clusters:
        train = np.sort(rng.choice(n, max_points_per_centroid * n_clusters, replace=False))
    n_train = n if train is None else train.shape[0]
    return rng, train, np.sort(rng.choice(n_train, n_clusters, replace=False))


def _lloyd(
    x: FloatArray, centroids: FloatArray, assign: IndexArray, rng: np.random.Generator, niter: int
) -> tuple[FloatArray, IndexArray]:
    """At most ``niter`` Lloyd iterations from centroids and the matching nearest-centroid
    assignment; stops at a fixed point. Returns the final centroids and assignment."""
    n_clusters = centroids.shape[0]
    dist: FloatArray | None = None
    # stale: centroids that may differ from their members' mean (all seeds at first)
    stale = np.ones(n_clusters, dtype=bool)
    for _ in range(niter):
        counts = np.bincount(assign, minlength=n_clusters)
        moved = stale.copy()
        centroids = _update_centroids(x, assign, counts, centroids, stale)
        stale[:] = False
        if not counts.all():
            touched = _split_clusters(centroids, counts, rng)
            moved[touched] = stale[touched] = True  # copies of a centroid, not means
        if dist is None:  # first iteration: every centroid moved
            dist_new, assign_new = _nearest_centroid(x, centroids)
        else:
            dist_new, assign_new = _reassign(x, centroids, assign, dist, moved)
        changed = np.nonzero(assign_new != assign)[0]
        if changed.size == 0 and counts.all():
            break  # fixed point: every centroid is its members' mean and nobody moves
        stale[assign[changed]] = stale[assign_new[changed]] = True
        assign, dist = assign_new, dist_new
    return centroids, assign


def _update_centroids(
    x: FloatArray, assign: IndexArray, counts: IndexArray, old: FloatArray, which: npt.NDArray[np.bool_]
) -> FloatArray:
    """Mean (float64 sums) of each non-empty cluster flagged in ``which``; the others keep their
    old centroid bit for bit."""
    rows = np.nonzero(which[assign])[0]
    rows = rows[np.argsort(assign[rows], kind="stable")]
    filled = np.nonzero(which & (counts > 0))[0]
    starts = np.concatenate([[0], np.cumsum(counts[filled])[:-1]])
    sums = np.add.reduceat(x[rows], starts, axis=0, dtype=np.float64) if filled.size else None
    out = old.copy()
    if sums is not None:
        out[filled] = (sums / counts[filled, None]).astype(np.float32)
    return out


def _split_clusters(centroids: FloatArray, counts: IndexArray, rng: np.random.Generator) -> IndexArray:
    """Refill each empty cluster by splitting a cluster drawn with probability proportional to
    (size - 1): both get its centroid, nudged by +-1/1024 per coordinate in opposite directions
    (faiss's rule). In place; returns the ids of the centroids it changed."""
    empty = np.nonzero(counts == 0)[0]
    weights = np.maximum(counts - 1, 0).astype(np.float64)
    if weights.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    donors = rng.choice(counts.shape[0], size=empty.shape[0], p=weights / weights.sum())
    nudge = np.where(np.arange(centroids.shape[1]) % 2 == 0, _SPLIT_EPS, -_SPLIT_EPS).astype(np.float32)
    counts = counts.copy()
    touched: list[int] = []
    for ci, cj in zip(empty, donors, strict=True):
        if counts[cj] < 2:
            continue  # drained by earlier splits this round; the next iteration retries
        centroids[ci] = centroids[cj] * (1 + nudge)
        centroids[cj] = centroids[cj] * (1 - nudge)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
        touched += [int(ci), int(cj)]
    return np.array(touched, dtype=np.int64)


def pair_f1(labels: ArrayInput, clusters: ArrayInput) -> float:
    """Pair-counting F1 of a clustering against labels.

    Over unordered pairs of items: precision = same-cluster pairs that share a label /
    same-cluster pairs, recall = same-label pairs put in one cluster / same-label pairs, F1 their
    harmonic mean = 2 TP / (same-cluster pairs + same-label pairs). Counted from the
    contingency table with n(n-1)/2 per cell, no pair loop. Two all-singleton partitions (no
    pairs at all) score 1.0.
    """
    a = as_labels(labels, None, "labels", allow_empty=False)
    b = as_labels(clusters, a.shape[0], "clusters", allow_empty=False)
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    _, cell = np.unique(ai.astype(np.int64) * (int(bi.max()) + 1) + bi, return_counts=True)

    def pairs(counts: npt.NDArray[np.int64]) -> int:
        c = counts.astype(np.int64)
        return int((c * (c - 1) // 2).sum())

    tp, same_cluster, same_label = pairs(cell), pairs(np.bincount(bi)), pairs(np.bincount(ai))
    if same_cluster + same_label == 0:
        return 1.0
    return 2.0 * tp / (same_cluster + same_label)


def nmi(labels: ArrayInput, clusters: ArrayInput) -> float:
    """Normalised mutual information I(L; C) / mean(H(L), H(C)) (sklearn, arithmetic mean)."""
    a = as_labels(labels, None, "labels", allow_empty=False)
    b = as_labels(clusters, a.shape[0], "clusters", allow_empty=False)
    return min(1.0, max(0.0, float(normalized_mutual_info_score(a, b))))


# --------------------------------------------------------------------------- the metrics


class _KnnSeeding:
    """kmeans_labels(x, n_clusters, seed) for evaluate_embeddings, with its first assignment
    (every point to its nearest seed point) read off the kNN lists already searched.

    The seeds are data rows (ids ascending with the row index) and the lists are exact top-k by
    (distance, index), so the first seed in a point's list is its nearest seed, and a seed row is
    its own. Rows with no seed in their list, a near-tie between seeds, or never searched (lone
    queries) are searched against the seeds as kmeans_labels does. Only used when kmeans_labels
    would train on every row (no subsampling).
    """

    def __init__(self, x: FloatArray, n_clusters: int, seed: int) -> None:
        self.x = x
        self.n_clusters = n_clusters
        n = x.shape[0]
        self.rng, train, self.seeds = _kmeans_plan(n, n_clusters, seed, _MAX_POINTS_PER_CENTROID)
        self.active = train is None
        self.centroid_of = np.full(n, -1, dtype=np.int64)  # seed row -> centroid id
        self.centroid_of[self.seeds] = np.arange(n_clusters)
        self.first = np.full(n, -1, dtype=np.int64)  # nearest seed's centroid id; -1: unknown
        # the largest seed norm, for the rounding bound in observe()
        self.seed_norm = float(np.sqrt(np.einsum("ij,ij->i", x[self.seeds], x[self.seeds]).max(initial=0.0)))

    def observe(self, rows: IndexArray, dist2: FloatArray, nbr: IndexArray) -> None:
        """Record the nearest seed of each searched row from its neighbours (nearest first)."""
        if not self.active:
            return
        ar = np.arange(rows.shape[0])
        cid = self.centroid_of[nbr]  # (B, K), -1 for non-seeds
        is_seed = cid >= 0
        has = is_seed.any(axis=1)
        col = is_seed.argmax(axis=1)
        found = cid[ar, col]
        # Near-ties are left to the faiss search that kmeans_labels would run, so that rounding
        # differences between the two searches cannot change the result. Either search forms
        # |x|^2 + |c|^2 - 2 x.c in float32 from d + 2 terms, off by at most
        # e = (d + 2)·2^-24·(|x| + |c|)^2 from the exact value (any kernel, any order); two
        # squared distances further apart than 4e keep their order in both, closer ones count
        # as tied (a few more rows searched, never a different answer).
        sq = np.einsum("ij,ij->i", self.x[rows], self.x[rows])
        tol = 4.0 * (self.x.shape[1] + 2) * 2.0**-24 * (np.sqrt(sq) + self.seed_norm) ** 2 + 1e-30
        is_seed[ar, col] = False
        has_second = is_seed.any(axis=1)
        second = dist2[ar, is_seed.argmax(axis=1)]
        clear = has & ~(has_second & (second - dist2[ar, col] <= tol))
        # a seed row is its own nearest seed unless another seed is within rounding of it
        own = self.centroid_of[rows]
        own_clear = ~(has & (dist2[ar, col] <= tol))
        self.first[rows] = np.where(own >= 0, np.where(own_clear, own, -1), np.where(clear, found, -1))

    def kmeans(self, niter: int) -> IndexArray:
        centroids = self.x[self.seeds].copy()
        assign = self.first.copy()
        missing = np.nonzero(assign < 0)[0]
        if missing.size:
            assign[missing] = _nearest_centroid(self.x[missing], centroids)[1]
        return _lloyd(self.x, centroids, assign, self.rng, niter)[1]


def _retrieval_block(
    rel: npt.NDArray[np.bool_], r: IndexArray, ks: tuple[int, ...]
) -> tuple[list[int], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """For a block of queries: hits per k, AP@R and R-precision per query.

    ``rel[i, j]``: the j-th neighbour of query i shares its label; ``r[i] >= 1`` its R; the block
    holds at least min(max(ks), N-1) and at least R neighbours per row.
    """
    kk = rel.shape[1]
    first = np.where(rel.any(axis=1), rel.argmax(axis=1), kk)  # rank (0-based) of the first hit
    hits = [int((first < min(k, kk)).sum()) for k in ks]
    rel_r = rel & (np.arange(kk) < r[:, None])  # relevant and within the top R
    cum = np.cumsum(rel_r, axis=1, dtype=np.int32)  # hits within the top i: P(i) = cum / i
    # sum_i P(i) rel(i) as one matrix-vector product with 1/i
    prec_sum = (cum * rel_r).astype(np.float64) @ (1.0 / np.arange(1, kk + 1))
    return hits, prec_sum / r, cum[:, -1] / r


def evaluate_embeddings(
    embeddings: ArrayInput,
    labels: ArrayInput,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    query_chunk: int | None = None,
    device: DeviceLike = None,
    backend: Backend = "auto",
    clustering: bool = True,
    seed: int = 0,
    kmeans_niter: int = 20,
    num_threads: int | None = None,
) -> dict[str, float]:
    """Leave-one-out retrieval and clustering metrics of a labelled embedding set.

    Returns ``{"R@k" for k in ks, "MAP@R", "RP", "NMI", "F1"}``, all in [0, 1] (see the module
    docstring for the definitions). Queries alone in their class are left out of R@k, MAP@R and
    RP; if none remains those are 0.0. ``clustering=False`` skips k-means and leaves NMI and F1
    out. k-means (``kmeans_labels``, ``seed``, at most ``kmeans_niter`` iterations) runs once and
    serves both NMI and F1.

    ``query_chunk`` queries are searched at a time (default: sized from the gallery so a block
    stays near 256 MiB). ``device``: where the torch kNN path runs (default: CUDA if available,
    else CPU, where faiss serves small k); ``backend`` forces "faiss" or "torch" (see
    ``das_core.retrieval.knn.ExactKnn``). ``num_threads`` sets faiss's and torch's threads for the call. Results are
    deterministic for the same inputs and settings.
    """
    x = as_matrix(embeddings, "embeddings", allow_empty=False)
    n = x.shape[0]
    y = as_labels(labels, n, "labels", allow_empty=False)
    ks = _check_ks(ks)
    if n < 2:
        raise ValueError(f"need at least 2 items to evaluate, got {n}")
    check_positive_int(query_chunk, "query_chunk")
    check_positive_int(num_threads, "num_threads")
    knn_func = ExactKnn(device=device, backend=backend)

    _, codes, class_sizes = np.unique(y, return_inverse=True, return_counts=True)
    codes = codes.astype(np.int32)  # narrower than int64: the label gathers are memory-bound
    r_all = class_sizes[codes] - 1  # R: other items of the query's class
    k_max = max(ks)
    # Neighbours each query needs: enough for R@max(ks) and for MAP@R/RP, never more than N-1.
    need = np.minimum(np.maximum(r_all, k_max), n - 1)
    queries = np.nonzero(r_all > 0)[0]
    # Group queries needing a similar number of neighbours, so a class of thousands does not make
    # every block search thousands.
    queries = queries[np.argsort(need[queries], kind="stable")]

    hits = np.zeros(len(ks), dtype=np.int64)
    ap_parts: list[npt.NDArray[np.float64]] = []
    rp_parts: list[npt.NDArray[np.float64]] = []
    n_classes = class_sizes.shape[0]
    seeding = _KnnSeeding(x, n_classes, seed) if clustering and 1 < n_classes < n else None
    with thread_limit(num_threads):
        searcher = knn_func.index(x)
        s = 0
        while s < queries.shape[0]:
            step = query_chunk or searcher.chunk_rows(int(need[queries[s]]))
            rows = queries[s : s + step]
            k_block = int(need[rows].max())
            if searcher.use_faiss(int(need[rows[0]])) != searcher.use_faiss(k_block):
                # do not let one block straddle the faiss / dense boundary
                rows = rows[need[rows] <= knn.FAISS_MAX_K]
                k_block = int(need[rows].max())
            dist2, nbr = searcher.search_squared(x[rows], k_block, rows)
            if seeding is not None:
                seeding.observe(rows, dist2, nbr)
            block_hits, ap, rp = _retrieval_block(codes[nbr] == codes[rows, None], r_all[rows], ks)
            hits += block_hits
            ap_parts.append(ap)
            rp_parts.append(rp)
            s += rows.shape[0]
        n_q = queries.shape[0]
        out: dict[str, float] = {}
        for k, h in zip(ks, hits, strict=True):
            out[f"R@{k}"] = float(h) / n_q if n_q else 0.0
        out["MAP@R"] = math.fsum(np.concatenate(ap_parts).tolist()) / n_q if n_q else 0.0
        out["RP"] = math.fsum(np.concatenate(rp_parts).tolist()) / n_q if n_q else 0.0
        if clustering:
            if seeding is not None and seeding.active:
                clusters = seeding.kmeans(kmeans_niter)
            else:
                clusters = kmeans_labels(x, n_classes, seed, niter=kmeans_niter)
            out["NMI"] = nmi(codes, clusters)
            out["F1"] = pair_f1(codes, clusters)
    return {key: min(1.0, max(0.0, v)) for key, v in out.items()}
