"""Exact k-nearest neighbours: the one kNN search of the library.

``ExactKnn`` is a small, frozen policy object (where it runs, which code path, whether
distances are recomputed exactly) that every caller takes, as pytorch-metric-learning's
accuracy calculator and inference model both take one ``knn_func``: the metrics
(``das_core.retrieval.evaluation``), the UMAP neighbour graph and point placement
(``das_core.explorer.projection``), the DAS analysis, the reports, and the ground truth that tunes
the approximate index (``das_core.retrieval.index``). ``knn(queries, gallery, k)`` searches once;
``knn.index(gallery)`` gives a ``KnnGallery`` to search many times. Two configured instances
serve the CPU callers: ``L2_KNN`` (faiss distances; the index's ground truth, the reports) and
``EXPLORER_KNN`` (distances recomputed exactly; the map's neighbour graph, placement and the DAS
analysis, where a copy of a point must be at distance 0).

Search is exact by squared Euclidean distance; ties are broken by the lower gallery index on
every code path. On CPU, faiss (``IndexFlatL2``) serves few neighbours and a chunked torch
matmul plus an exact partial sort serves many (see ``FAISS_MAX_K``); on a CUDA device (faiss-cpu
has no GPU build) the torch path runs there. A query is left out of its own results by index
(``exclude``), never by dropping the first neighbour: a duplicate may tie with it at distance 0
and come first. Nothing of size N x N is held in memory.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import faiss
import numpy as np
import torch

from das_core.arrays import ArrayInput, FloatArray, IndexArray, as_exclude, as_matrix, check_positive_int
from das_core.runtime import DeviceLike, resolve_device

__all__ = ["EXPLORER_KNN", "FAISS_MAX_K", "L2_KNN", "Backend", "ExactKnn", "KnnGallery", "l2_normalize"]

Backend: TypeAlias = Literal["auto", "faiss", "torch"]

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

# Test hook: run the device (torch.topk) selection on CPU too, so that branch is covered
# without a GPU.
_TORCH_SELECT_ON_CPU = False


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


class KnnGallery:
    """One gallery made searchable by an ``ExactKnn`` (``ExactKnn.index``): the faiss index or
    the dense matrix is built on the first search and reused by every later one."""

    def __init__(
        self, gallery: FloatArray, device: torch.device, backend: Backend, threads: int, exact_distances: bool
    ) -> None:
        self.gallery = gallery
        self.device = device
        self.backend = backend
        self.threads = max(1, threads)
        self.exact_distances = exact_distances
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

    def __len__(self) -> int:
        return int(self.gallery.shape[0])

    @property
    def dim(self) -> int:
        return int(self.gallery.shape[1])

    def search(
        self, queries: ArrayInput, k: int, *, exclude: int | ArrayInput | None = None, chunk: int | None = None
    ) -> tuple[FloatArray, IndexArray]:
        """The ``k`` nearest gallery items of each query: ``(distances, indices)``, each
        (queries x k), nearest first, distances Euclidean (not squared) float32, ties broken by
        the lower gallery index. ``exclude`` (``das_core.arrays.as_exclude``: one gallery index
        per query, or one for all; -1 = none) leaves that item out of the query's results: by
        index, so a duplicate of the query is still found. ``k`` is capped at the items
        searchable (the gallery, less one with ``exclude``); no query or nothing searchable
        gives ``(queries x 0)`` results. ``chunk`` queries are searched at a time (default: all
        at once on faiss, which tiles them itself; blocks near 256 MiB on the dense path).
        With ``exact_distances`` the distances are recomputed from the vectors and the
        neighbours re-sorted by them (faiss's matrix-product distances are off by ~1e-4 near
        zero): a copy of a gallery item is then at distance exactly 0."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        check_positive_int(chunk, "chunk")
        q = as_matrix(queries, "queries", dim=self.dim)
        self_idx = as_exclude(exclude, q.shape[0], len(self))
        k = min(int(k), len(self) - (0 if self_idx is None else 1))
        if k < 1 or q.shape[0] == 0:
            k = max(k, 0)
            return np.zeros((q.shape[0], k), np.float32), np.zeros((q.shape[0], k), np.int64)
        step = chunk or (q.shape[0] if self.use_faiss(k) else self.chunk_rows(k))
        dists = np.empty((q.shape[0], k), dtype=np.float32)
        idxs = np.empty((q.shape[0], k), dtype=np.int64)
        for s in range(0, q.shape[0], step):
            e = min(s + step, q.shape[0])
            d2, i = self.search_squared(q[s:e], k, None if self_idx is None else self_idx[s:e])
            dists[s:e] = np.sqrt(d2)
            idxs[s:e] = i
        if self.exact_distances:
            return self._exact(q, idxs)
        return dists, idxs

    def _exact(self, q: FloatArray, idx: IndexArray) -> tuple[FloatArray, IndexArray]:
        """Distances recomputed from the vectors, neighbours re-sorted by them (stable)."""
        g, k = self.gallery, idx.shape[1]
        dist = np.empty(idx.shape, np.float32)
        step = max(1, (1 << 22) // max(1, k * g.shape[1]))  # bound the (step, k, d) temporary to 16 MiB
        for s in range(0, q.shape[0], step):
            dist[s : s + step] = np.linalg.norm(g[idx[s : s + step]] - q[s : s + step, None, :], axis=2)
        # re-sort by the exact distances (rounding can swap near-ties)
        order = np.argsort(dist, axis=1, kind="stable")
        return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)

    def search_squared(self, q: FloatArray, k: int, self_idx: IndexArray | None) -> tuple[FloatArray, IndexArray]:
        """One block: squared distances and indices of the k nearest gallery items of each
        (validated, float32) query row, nearest first, leaving out gallery item ``self_idx[i]``
        for row i (-1: none); ``k`` must not exceed the items searchable."""
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


@dataclass(frozen=True)
class ExactKnn:
    """Exact k-nearest neighbours: ``knn(queries, gallery, k, exclude=..., chunk=...)`` or
    ``knn.index(gallery).search(...)`` (see ``KnnGallery.search``).

    ``device``: where the torch path runs (``das_core.runtime.resolve_device``; "auto" is CUDA
    when available). ``backend``: "faiss" (CPU only, any k), "torch" (matmul + exact partial
    sort on ``device``) or "auto" (on CPU faiss for k <= ``FAISS_MAX_K`` and torch above;
    elsewhere torch). ``exact_distances``: recompute the returned distances from the vectors
    (see ``KnnGallery.search``). Searches run on torch's current thread count.
    """

    device: DeviceLike = "cpu"
    backend: Backend = "auto"
    exact_distances: bool = False
    resolved_device: torch.device = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        dev = resolve_device(self.device)
        if self.backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"backend must be 'auto', 'faiss' or 'torch', got {self.backend!r}")
        if self.backend == "faiss" and dev.type != "cpu":
            raise ValueError("backend 'faiss' runs on CPU only (faiss-cpu)")
        object.__setattr__(self, "resolved_device", dev)

    def index(self, gallery: ArrayInput) -> KnnGallery:
        """``gallery`` (n, d), checked (``das_core.arrays.as_matrix``), made searchable."""
        g = as_matrix(gallery, "gallery")
        return KnnGallery(g, self.resolved_device, self.backend, torch.get_num_threads(), self.exact_distances)

    def __call__(
        self,
        queries: ArrayInput,
        gallery: ArrayInput,
        k: int,
        *,
        exclude: int | ArrayInput | None = None,
        chunk: int | None = None,
    ) -> tuple[FloatArray, IndexArray]:
        """The ``k`` nearest ``gallery`` items of each query: ``self.index(gallery).search(...)``."""
        return self.index(gallery).search(queries, k, exclude=exclude, chunk=chunk)


def l2_normalize(x: ArrayInput) -> FloatArray:
    """Rows scaled to unit length (zero rows stay zero), as C-contiguous float32."""
    a = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return np.ascontiguousarray(a / np.maximum(norms, 1e-12), dtype=np.float32)


# CPU faiss at any k, as the explorer and the index always searched (see the module docstring).
L2_KNN = ExactKnn(device="cpu", backend="faiss")
EXPLORER_KNN = ExactKnn(device="cpu", backend="faiss", exact_distances=True)
