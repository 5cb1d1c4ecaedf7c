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

Nearest neighbours on CPU come from faiss (``IndexFlatL2``, exact) when few are needed, and from
a chunked torch matmul plus an exact partial sort when many are (MAP@R on classes of thousands);
on a CUDA device (faiss-cpu has no GPU build) the torch path runs there. k-means uses faiss for
its assignment step; ``evaluate_embeddings`` reads its first assignment (each point to the nearest
seed point) off the kNN lists it has already searched. Nothing of size N x N is held in memory.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeAlias

import faiss
import numpy as np
import numpy.typing as npt
import torch
from sklearn.metrics import normalized_mutual_info_score

__all__ = [
    "FAISS_MAX_K",
    "ArrayInput",
    "Backend",
    "evaluate_embeddings",
    "kmeans_labels",
    "knn_indices",
    "nmi",
    "pair_f1",
]

FloatArray: TypeAlias = npt.NDArray[np.float32]
IndexArray: TypeAlias = npt.NDArray[np.int64]
ArrayInput: TypeAlias = "npt.ArrayLike | torch.Tensor"
Backend: TypeAlias = Literal["auto", "faiss", "torch"]
DeviceLike: TypeAlias = "str | torch.device | None"

# Where the CPU kNN switches from faiss to the torch-matmul + numpy partial-sort path.
# Measured with `python bench/bench_evaluation.py --knn-paths` on the 2-core AMD EPYC dev box
# (Fashion-like 35,000 x 128 set against itself, 2 threads; seconds for all 35,000 queries,
# extrapolated from 2,000; bench/results/evaluation_knn_paths.json):
#   k       faiss IndexFlatL2.search   torch mm + numpy partition/sort   torch mm + torch.topk
#   32              3.8                          7.2                             24.1
#   256             5.2                          5.7                             20.9
#   512             5.5                          6.0                             22.8
#   1,000           9.8                          6.8                             26.7
#   7,000          43.3                         12.1                             33.5
# faiss's per-query heap / reservoir gets slow for large k and torch.topk on CPU is slow at any
# k, while the numpy path costs about the same for any k: an O(N) introselect finds each row's
# k-th distance, and only the <= k candidates are sorted (packed distance|index int64 keys:
# vectorised sort, ties broken by index). So faiss serves R@k and small classes, the numpy path
# MAP@R / RP on large classes (Fashion-MNIST-like, R = 6,999). Both are exact.
FAISS_MAX_K = 512

_DENSE_CHUNK_BYTES = 256 * 2**20  # working memory of one dense chunk (distances + selection)
_FAISS_CHUNK = 8192  # queries per faiss search call (faiss tiles internally; output is small)
_INT64_MAX = np.iinfo(np.int64).max
_LOW32 = 0xFFFFFFFF
_MAX_POINTS_PER_CENTROID = 256  # k-means trains on at most this many rows per cluster (faiss's default)
_SPLIT_EPS = 1.0 / 1024.0  # faiss's perturbation when it splits a cluster to refill an empty one

# Test hook: run the device (torch.topk) selection on CPU too, so that branch is covered
# without a GPU.
_TORCH_SELECT_ON_CPU = False


# --------------------------------------------------------------------------- input checks


def _as_embeddings(x: ArrayInput, name: str = "embeddings") -> FloatArray:
    """Validate and convert to a C-contiguous float32 (n, d) array with finite values."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be real numbers, got dtype {t.dtype}")
        arr: np.ndarray = t.to(device="cpu", dtype=torch.float32).numpy()
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) array, got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(arr.shape)})")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} contain NaN or inf (or values too large for float32)")
    return out


def _as_label_vector(y: ArrayInput, n: int | None, name: str = "labels") -> IndexArray:
    """Validate and convert integer labels of shape (n,) or (n, 1) to int64."""
    arr = y.detach().to("cpu").numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "iub":
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but there are {n} embeddings")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return arr.astype(np.int64, copy=False)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    out = tuple(ks)
    if not out:
        raise ValueError("ks must name at least one k")
    for k in out:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"every k in ks must be an integer >= 1, got {k!r}")
    return tuple(int(k) for k in out)


def _check_positive_int(value: int | None, name: str) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1
    ):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def _check_backend(backend: str, device: torch.device) -> None:
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
    if backend == "faiss" and device.type != "cpu":
        raise ValueError("backend 'faiss' runs on CPU only (faiss-cpu)")


def _resolve_device(device: DeviceLike) -> torch.device:
    """None: CUDA when available, else CPU. An unavailable CUDA device is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {dev} requested but CUDA is not available")
    return dev


@contextlib.contextmanager
def _threads(num_threads: int | None) -> Iterator[None]:
    """Temporarily set faiss's and torch's thread counts (None: leave them alone)."""
    if num_threads is None:
        yield
        return
    old_faiss, old_torch = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(num_threads)
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old_faiss)
        torch.set_num_threads(old_torch)


# --------------------------------------------------------------------------- nearest neighbours


def _drop_self(dist: FloatArray, idx: IndexArray, self_idx: IndexArray) -> tuple[FloatArray, IndexArray]:
    """From k+1 neighbours per row keep k: drop the entry whose index is the row's own index if
    present, otherwise the last one."""
    is_self = idx == self_idx[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    n, k1 = idx.shape
    return dist[keep].reshape(n, k1 - 1), idx[keep].reshape(n, k1 - 1)


def _select_rows_numpy(d: FloatArray, k: int) -> tuple[FloatArray, IndexArray]:
    """k smallest entries of every row of a (B, N) block of non-negative squared distances,
    ascending, ties by column index; NaN entries are never selected. Needs B * N < 2**32.

    An O(N) introselect finds each row's k-th value, a flat scan keeps the entries <= it (k per
    row, plus any further ties with the k-th value, which are dropped from the highest column
    down), and only those are sorted, as packed int64 keys ``float_bits << 32 | flat_index``:
    non-negative float32 bits order like the floats, and within a row the flat index orders like
    the column.
    """
    b, n = d.shape
    kth = np.partition(d, k - 1, axis=1)[:, k - 1]  # NaN sorts last, so it is never the k-th
    mask = d <= kth[:, None]  # False for NaN
    flat = np.flatnonzero(mask)  # row-major; much faster than a 2-D np.nonzero
    vals = d.ravel()[flat]
    if flat.size != b * k:  # some rows tie with their k-th value: keep the lowest columns
        counts = np.count_nonzero(mask, axis=1)
        row_of = np.repeat(np.arange(b), counts)
        eq = np.flatnonzero(vals == kth[row_of])  # candidates equal to their row's k-th value
        eq_row = row_of[eq]
        eq_per_row = np.bincount(eq_row, minlength=b)
        from_end = (np.cumsum(eq_per_row) - 1)[eq_row] - np.arange(eq.size)  # 0 = last in row
        keep = np.ones(flat.size, dtype=bool)
        keep[eq[from_end < (counts - k)[eq_row]]] = False
        flat, vals = flat[keep], vals[keep]
    # "& 0x7FFFFFFF" maps -0.0 to +0.0 (the only negative a clamped distance can be)
    keys = ((vals.view(np.int32) & 0x7FFFFFFF).astype(np.int64) << 32) | flat
    table = keys.reshape(b, k)
    table.sort(axis=1)
    cols = (table & _LOW32) - (np.arange(b, dtype=np.int64) * n)[:, None]
    return (table >> 32).astype(np.int32).view(np.float32), cols


def _select_rows_torch(d: torch.Tensor, k: int, self_idx: IndexArray | None) -> tuple[FloatArray, IndexArray]:
    """Device version of ``_select_rows_numpy`` with torch.topk on the same packed keys."""
    b, n = d.shape
    bits = (d.view(torch.int32) & 0x7FFFFFFF).to(torch.int64)  # -0.0 -> +0.0
    keys = (bits << 32) | torch.arange(n, device=d.device)
    if self_idx is not None:
        rows = np.nonzero(self_idx >= 0)[0]
        keys[torch.from_numpy(rows).to(d.device), torch.from_numpy(self_idx[rows]).to(d.device)] = _INT64_MAX
    top = torch.topk(keys, k, dim=1, largest=False, sorted=True).values.cpu()
    dist = (top >> 32).to(torch.int32).view(torch.float32).numpy()
    return dist, (top & _LOW32).numpy()


class _Searcher:
    """Exact squared-L2 kNN of query blocks against one gallery, on faiss or torch."""

    def __init__(self, gallery: FloatArray, device: torch.device, backend: Backend, threads: int) -> None:
        self.gallery = gallery
        self.device = device
        self.backend = backend
        self.threads = max(1, threads)
        self._index: faiss.IndexFlatL2 | None = None
        self._g_aug: torch.Tensor | None = None
        self._buf: torch.Tensor | None = None

    def use_faiss(self, k: int) -> bool:
        if self.device.type != "cpu" or self.backend == "torch":
            return False
        return self.backend == "faiss" or k <= FAISS_MAX_K

    def chunk_rows(self, k: int) -> int:
        """Default number of queries per block for a search of k neighbours."""
        if self.use_faiss(k):
            return _FAISS_CHUNK
        # bytes per distance entry: numpy selection = distances 4 + partition copy 4 + mask and
        # temporaries ~8; torch selection = distances 4 + int64 keys 8 + temporaries ~12
        numpy_select = self.device.type == "cpu" and not _TORCH_SELECT_ON_CPU
        per_row = (16 if numpy_select else 24) * self.gallery.shape[0]
        return int(min(8192, max(16, _DENSE_CHUNK_BYTES // per_row)))

    def search(self, q: FloatArray, k: int, self_idx: IndexArray | None) -> tuple[FloatArray, IndexArray]:
        """Squared distances and indices of the k nearest gallery items of each query row,
        nearest first, leaving out gallery item ``self_idx[i]`` for row i (-1: none)."""
        if self.use_faiss(k):
            return self._search_faiss(q, k, self_idx)
        return self._search_dense(q, k, self_idx)

    def _search_faiss(
        self, q: FloatArray, k: int, self_idx: IndexArray | None
    ) -> tuple[FloatArray, IndexArray]:
        if self._index is None:
            self._index = faiss.IndexFlatL2(self.gallery.shape[1])
            self._index.add(self.gallery)
        if self_idx is None:
            dist, idx = self._index.search(q, k)
            return dist, idx.astype(np.int64, copy=False)
        # k+1 neighbours, then drop the query by index (see _drop_self).
        dist, idx = self._index.search(q, k + 1)
        return _drop_self(dist, idx.astype(np.int64, copy=False), self_idx)

    def _search_dense(
        self, q: FloatArray, k: int, self_idx: IndexArray | None
    ) -> tuple[FloatArray, IndexArray]:
        # One matmul gives the squared distances: [-2q, |q|^2, 1] . [g, 1, |g|^2].
        if self._g_aug is None:
            g = torch.from_numpy(self.gallery)
            ones = torch.ones((g.shape[0], 1))
            self._g_aug = torch.cat([g, ones, g.square().sum(dim=1, keepdim=True)], dim=1).to(self.device)
        qt = torch.from_numpy(q)
        q_aug = torch.cat(
            [-2.0 * qt, qt.square().sum(dim=1, keepdim=True), torch.ones((q.shape[0], 1))], dim=1
        )
        b = q.shape[0]
        if self._buf is None or self._buf.shape[0] < b:  # reused: no fresh pages every block
            self._buf = torch.empty((b, self.gallery.shape[0]), dtype=torch.float32, device=self.device)
        d = self._buf[:b]
        torch.mm(q_aug.to(self.device), self._g_aug.T, out=d)
        d.clamp_(min=0.0)  # rounding can dip below 0
        if self.device.type != "cpu" or _TORCH_SELECT_ON_CPU:
            return _select_rows_torch(d, k, self_idx)
        dn: FloatArray = d.numpy()
        if self_idx is not None:
            # Leave the query out by its index: NaN is never selected. Equivalent to searching
            # k+1 and dropping it, without the extra column.
            rows = np.nonzero(self_idx >= 0)[0]
            dn[rows, self_idx[rows]] = np.nan
        # Row blocks: one per thread (numpy's partition and sort release the GIL) and small
        # enough for the 32-bit flat index of _select_rows_numpy.
        parts = max(min(self.threads, dn.shape[0] // 64), -(-dn.size // 2**31), 1)
        if parts == 1:
            return _select_rows_numpy(dn, k)
        bounds = np.linspace(0, dn.shape[0], parts + 1).astype(int)
        with ThreadPoolExecutor(max_workers=min(parts, self.threads)) as pool:
            results = list(
                pool.map(lambda i: _select_rows_numpy(dn[bounds[i] : bounds[i + 1]], k), range(parts))
            )
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])


def knn_indices(
    queries: ArrayInput,
    gallery: ArrayInput,
    k: int,
    *,
    exclude_self_index: ArrayInput | None = None,
    chunk: int | None = None,
    device: DeviceLike = None,
    backend: Backend = "auto",
) -> tuple[FloatArray, IndexArray]:
    """Exact k nearest gallery items of every query by Euclidean distance.

    Returns ``(distances, indices)``, both (n_queries, k), nearest first, distances Euclidean
    (not squared) float32, ties broken by the lower gallery index. ``exclude_self_index[i]`` is a
    gallery index to leave out for query i (-1: none), e.g. ``np.arange(n)`` when the queries are
    the gallery; it is excluded by index (k+1 neighbours are searched and that entry, or else the
    last one, dropped), so duplicates of the query are still returned. ``chunk`` queries are
    searched at a time (default: sized to keep working memory near 256 MiB). ``device``: where
    the torch path runs (default: CUDA if available, else CPU). ``backend``: "faiss" (CPU only),
    "torch" (matmul + exact partial sort on ``device``) or "auto" (on CPU faiss for
    k <= FAISS_MAX_K and torch above; elsewhere torch).
    """
    q = _as_embeddings(queries, "queries")
    g = _as_embeddings(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]} but the gallery has {g.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    k = int(k)
    _check_positive_int(chunk, "chunk")
    dev = _resolve_device(device)
    _check_backend(backend, dev)
    self_idx: IndexArray | None = None
    if exclude_self_index is not None:
        self_idx = _as_label_vector(exclude_self_index, q.shape[0], "exclude_self_index")
        if ((self_idx < -1) | (self_idx >= g.shape[0])).any():
            raise ValueError("exclude_self_index entries must be gallery indices or -1")
        if k > g.shape[0] - 1:
            raise ValueError(
                f"k={k} but only {g.shape[0] - 1} gallery items remain once the query is left out"
            )
    elif k > g.shape[0]:
        raise ValueError(f"k={k} exceeds the gallery size {g.shape[0]}")
    searcher = _Searcher(g, dev, backend, torch.get_num_threads())
    step = chunk or searcher.chunk_rows(k)
    dists = np.empty((q.shape[0], k), dtype=np.float32)
    idxs = np.empty((q.shape[0], k), dtype=np.int64)
    for s in range(0, q.shape[0], step):
        e = min(s + step, q.shape[0])
        d2, i = searcher.search(q[s:e], k, None if self_idx is None else self_idx[s:e])
        dists[s:e] = np.sqrt(d2)
        idxs[s:e] = i
    return dists, idxs


# --------------------------------------------------------------------------- clustering


def _nearest_centroid(x: FloatArray, centroids: FloatArray) -> tuple[FloatArray, IndexArray]:
    """Squared distance to and id of the nearest centroid of every row (faiss, ties: lower id)."""
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(centroids)
    dist, idx = index.search(x, 1)
    return dist[:, 0], idx[:, 0].astype(np.int64)


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
    arr = _as_embeddings(x, "x")
    n = arr.shape[0]
    if (
        isinstance(n_clusters, bool)
        or not isinstance(n_clusters, int | np.integer)
        or not 1 <= n_clusters <= n
    ):
        raise ValueError(f"n_clusters must be an integer in [1, {n}], got {n_clusters!r}")
    _check_positive_int(niter, "niter")
    _check_positive_int(max_points_per_centroid, "max_points_per_centroid")
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
    a = _as_label_vector(labels, None, "labels")
    b = _as_label_vector(clusters, a.shape[0], "clusters")
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
    a = _as_label_vector(labels, None, "labels")
    b = _as_label_vector(clusters, a.shape[0], "clusters")
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
    ``knn_indices``). ``num_threads`` sets faiss's and torch's threads for the call. Results are
    deterministic for the same inputs and settings.
    """
    x = _as_embeddings(embeddings)
    n = x.shape[0]
    y = _as_label_vector(labels, n)
    ks = _check_ks(ks)
    if n < 2:
        raise ValueError(f"need at least 2 items to evaluate, got {n}")
    _check_positive_int(query_chunk, "query_chunk")
    _check_positive_int(num_threads, "num_threads")
    dev = _resolve_device(device)
    _check_backend(backend, dev)

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
    with _threads(num_threads):
        searcher = _Searcher(x, dev, backend, torch.get_num_threads())
        s = 0
        while s < queries.shape[0]:
            step = query_chunk or searcher.chunk_rows(int(need[queries[s]]))
            rows = queries[s : s + step]
            k_block = int(need[rows].max())
            if searcher.use_faiss(int(need[rows[0]])) != searcher.use_faiss(k_block):
                # do not let one block straddle the faiss / dense boundary
                rows = rows[need[rows] <= FAISS_MAX_K]
                k_block = int(need[rows].max())
            dist2, nbr = searcher.search(x[rows], k_block, rows)
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
