"""Nearest-neighbour search over a gallery of embeddings, from 1k to 1M+ items.

``RetrievalIndex.build`` picks the index by gallery size: exact search (faiss ``IndexFlatL2``)
up to ``exact_threshold`` items, an approximate index above it (IVF-Flat by default; HNSW on
request). The approximate index's search depth (IVF ``nprobe``, HNSW ``efSearch``) is tuned at
build time against exact search on a sample of the gallery, to the smallest value that reaches
``target_recall`` recall@10; the chosen parameters are recorded in ``params`` and in
``index.json`` beside the saved index.

Distances are Euclidean (L2), **not squared**. Queries and galleries are numpy arrays
(converted to contiguous float32); a single query may be a 1-D vector, and then the results
are 1-D too.

faiss runs on OpenMP threads; the count is set explicitly (``threads`` argument, else
``das_core.runtime.default_threads()``: ``$DAS_FAISS_THREADS``, else the usable CPU cores, at
most 8; two on this machine) with ``das_core.runtime.thread_limit``, because
faiss otherwise follows ``OMP_NUM_THREADS``, which the app lowers for training jobs. Builds
and batches of queries use them all; a single query (or a batch under ``SMALL_BATCH``) runs on
one thread, since fanning one scan out costs more than it saves (100k x 512: 20 ms on one
thread, 72 ms on two busy cores).

Measured on 2 cores (``bench/bench_index.py``, results in ``bench/results/index.json``): see
``DEFAULT_EXACT_THRESHOLD`` and ``APPROX_KIND`` for the choices those numbers led to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

import faiss
import numpy as np
import numpy.typing as npt

from das_core.arrays import as_exclude, as_matrix
from das_core.retrieval.knn import L2_KNN
from das_core.runtime import resolve_threads, thread_limit
from das_core.store.cache import CacheMiss, DiskCache
from das_core.store.io import atomic_write, atomic_write_json

if TYPE_CHECKING:
    from das_core.store.cache import EmbeddingSet

log = logging.getLogger("das_core.retrieval.index")

KINDS = ("flat", "ivf", "hnsw")
# Exact search up to this many items: a single query over 100k x 512 takes ~20 ms on this
# 2-core machine; above it exact latency grows linearly (1M x 128: 48 ms) while IVF stays < 1 ms.
DEFAULT_EXACT_THRESHOLD = 100_000
# On 1M x 128 clustered embeddings with 2 cores (bench/results/index.json) IVF-Flat (nlist 4000)
# built in 100-130 s and reached recall@10 0.98 at nprobe 4 in 0.2 ms per query (>200x exact);
# HNSW (M 32, efConstruction 40) took 110-190 s and needed efSearch 1024 for 0.97 at 1.9 ms.
APPROX_KIND = "ivf"
DEFAULT_TARGET_RECALL = 0.95
TUNE_MARGIN = 0.025
# Batches smaller than this are searched on one thread (see ``RetrievalIndex.search``).
SMALL_BATCH = 16
INDEX_FILE = "index.faiss"
META_FILE = "index.json"
FORMAT_VERSION = 1

# Search depths tried, in order, when tuning (the first that reaches the target recall wins).
NPROBE_STEPS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
EF_SEARCH_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


class BuildOptions(TypedDict, total=False):
    """How ``RetrievalIndex.build`` builds an index (and ``load_or_build`` checks a saved one)."""

    kind: str
    exact_threshold: int
    params: Mapping[str, Any] | None
    threads: int | None
    target_recall: float


class IndexFileError(ValueError):
    """A saved index is missing, unreadable or does not match its ``index.json``."""


def fingerprint(embeddings: FloatArray) -> str:
    """A hash of the gallery's shape and values: a saved index is reused only for the same data."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(embeddings.shape).encode())
    h.update(np.ascontiguousarray(embeddings, dtype=np.float32).data)
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# -- building -------------------------------------------------------------------------------------


def resolve_kind(size: int, kind: str = "auto", exact_threshold: int = DEFAULT_EXACT_THRESHOLD) -> str:
    """The index kind ``build`` uses for a gallery of ``size`` items."""
    if kind == "auto":
        return "flat" if size <= exact_threshold else APPROX_KIND
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; use auto or one of {', '.join(KINDS)}")
    return kind


def default_nlist(size: int) -> int:
    """About 4 * sqrt(N) inverted lists, but at least 39 training points per list."""
    return max(1, min(round(4 * math.sqrt(size)), size // 39))


def _build_flat(x: FloatArray, params: dict[str, Any]) -> faiss.Index:
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    return index


def _build_ivf(x: FloatArray, params: dict[str, Any]) -> faiss.Index:
    n, d = x.shape
    nlist = int(params.setdefault("nlist", default_nlist(n)))
    quantizer = faiss.IndexFlatL2(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
    # k-means on a sample: train_per_list points per list (faiss subsamples with cp.seed).
    index.cp.max_points_per_centroid = int(params.setdefault("train_per_list", 64))
    index.cp.niter = int(params.setdefault("kmeans_iters", 10))
    index.cp.seed = int(params.setdefault("seed", 0))
    index.train(x)  # (faiss's Python wrapper keeps the quantizer alive with the index)
    index.add(x)
    return index


def _build_hnsw(x: FloatArray, params: dict[str, Any]) -> faiss.Index:
    index = faiss.IndexHNSWFlat(x.shape[1], int(params.setdefault("M", 32)), faiss.METRIC_L2)
    index.hnsw.efConstruction = int(params.setdefault("efConstruction", 40))
    index.add(x)
    return index


_BUILDERS: dict[str, Callable[[FloatArray, dict[str, Any]], faiss.Index]] = {
    "flat": _build_flat,
    "ivf": _build_ivf,
    "hnsw": _build_hnsw,
}
# The search-depth parameter of each approximate kind, and the values tried when tuning it.
_DEPTH: dict[str, tuple[str, tuple[int, ...]]] = {"ivf": ("nprobe", NPROBE_STEPS), "hnsw": ("efSearch", EF_SEARCH_STEPS)}


def _set_depth(index: Any, kind: str, value: int) -> None:
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(value)
    elif kind == "hnsw":
        index.hnsw.efSearch = int(value)


# -- search helpers -------------------------------------------------------------------------------


def _drop_excluded(dist: FloatArray, idx: IntArray, exclude: IntArray, k: int) -> tuple[FloatArray, IntArray]:
    """Remove each row's excluded gallery index (only that index: a duplicate of the query's
    vector under another index stays), keeping the order, and cut the rows to ``k``."""
    hit = (idx == exclude[:, None]) & (exclude[:, None] >= 0)
    order = np.argsort(hit, axis=1, kind="stable")  # kept entries first, in their order
    return np.take_along_axis(dist, order, axis=1)[:, :k], np.take_along_axis(idx, order, axis=1)[:, :k]


def _finish(sq_dist: FloatArray, idx: IntArray) -> tuple[FloatArray, IntArray]:
    """Squared L2 from faiss -> L2; missing results (index -1) get distance +inf."""
    dist = np.sqrt(np.maximum(sq_dist, 0.0)).astype(np.float32, copy=False)
    dist[idx < 0] = np.inf
    return dist, idx.astype(np.int64, copy=False)


def recall_at_k(found: npt.NDArray[np.int64], truth: npt.NDArray[np.int64]) -> float:
    """Mean fraction of each row of ``truth`` (exact neighbours) present in the row of ``found``."""
    k = int(truth.shape[1])
    hits = sum(len(set(f.tolist()) & set(t.tolist()) - {-1}) for f, t in zip(found, truth, strict=True))
    return float(hits) / (k * len(truth))


# -- the index ------------------------------------------------------------------------------------


class RetrievalIndex:
    """A faiss index over a gallery plus what is needed to search, save and reuse it."""

    def __init__(
        self,
        index: faiss.Index,
        kind: str,
        params: Mapping[str, Any],
        *,
        build_seconds: float = 0.0,
        tune_seconds: float = 0.0,
        fingerprint: str | None = None,
        threads: int | None = None,
    ) -> None:
        self.index = index
        self.kind = kind
        self.params: dict[str, Any] = dict(params)
        self.build_seconds = build_seconds
        self.tune_seconds = tune_seconds
        self.fingerprint = fingerprint
        self.threads = resolve_threads(threads)
        depth = _DEPTH.get(kind)
        if depth is not None and depth[0] in self.params:
            _set_depth(index, kind, int(self.params[depth[0]]))

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"RetrievalIndex(kind={self.kind!r}, size={self.size}, dim={self.dim}, params={self.params})"

    # -- build ------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        embeddings: npt.ArrayLike,
        *,
        kind: str = "auto",
        exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
        params: Mapping[str, Any] | None = None,
        threads: int | None = None,
        target_recall: float = DEFAULT_TARGET_RECALL,
    ) -> RetrievalIndex:
        """Index ``embeddings`` (items x dim). ``kind``: "auto" (exact up to ``exact_threshold``
        items, ``APPROX_KIND`` above), or force "flat", "ivf" or "hnsw". ``params`` overrides the
        kind's parameters (ivf: nlist, nprobe, train_per_list, kmeans_iters, seed; hnsw: M,
        efConstruction, efSearch); a search depth not given is tuned to ``target_recall``."""
        x = as_matrix(embeddings, "embeddings", allow_empty=False)
        chosen = resolve_kind(len(x), kind, exact_threshold)
        n_threads = resolve_threads(threads)
        p = dict(params or {})
        t0 = time.perf_counter()
        with thread_limit(n_threads):
            index = _BUILDERS[chosen](x, p)
        built = cls(index, chosen, p, fingerprint=fingerprint(x), threads=n_threads)
        depth = _DEPTH.get(chosen)
        if depth is not None and depth[0] not in p:
            t_tune = time.perf_counter()
            built._tune_depth(x, target_recall)
            built.tune_seconds = time.perf_counter() - t_tune
        built.build_seconds = time.perf_counter() - t0  # including the tuning
        log.info("built %r in %.1f s", built, built.build_seconds)
        return built

    def _tune_depth(self, x: FloatArray, target: float, n_queries: int = 500, k: int = 10) -> None:
        """Pick the smallest search depth whose leave-one-out recall@k, against exact search on
        ``n_queries`` gallery items, reaches ``target`` + ``TUNE_MARGIN`` (the margin covers the
        sample's noise and queries from outside the gallery); record it and the recall."""
        name, steps = _DEPTH[self.kind]
        rng = np.random.default_rng(int(self.params.get("seed", 0)))
        qi = np.sort(rng.choice(len(x), size=min(n_queries, len(x)), replace=False)).astype(np.int64)
        k = min(k, len(x) - 1)
        if k < 1:
            self.params[name] = steps[0]
            return
        truth = L2_KNN(x[qi], x, k, exclude=qi)[1]
        limit = self._depth_limit()
        best = (steps[0], -1.0)
        for value in steps:
            value = min(value, limit)
            _set_depth(self.index, self.kind, value)
            found = self.search(x[qi], k, exclude=qi)[1]
            recall = recall_at_k(found, truth)
            if recall > best[1]:
                best = (value, recall)
            if recall >= min(1.0, target + TUNE_MARGIN) or value >= limit:
                break
        self.params[name] = int(best[0])
        self.params["tuned_recall@10"] = round(best[1], 4)
        _set_depth(self.index, self.kind, best[0])

    @property
    def search_depth(self) -> tuple[str, int] | None:
        """The approximate index's search-depth parameter and value (``None`` for exact)."""
        depth = _DEPTH.get(self.kind)
        return None if depth is None else (depth[0], int(self.params[depth[0]]))

    def set_search_depth(self, value: int) -> None:
        """Trade recall for speed: IVF ``nprobe`` or HNSW ``efSearch`` (exact search has none)."""
        depth = _DEPTH.get(self.kind)
        if depth is None:
            raise ValueError("an exact (flat) index has no search depth to set")
        if value < 1:
            raise ValueError(f"{depth[0]} must be at least 1, got {value}")
        self.params[depth[0]] = int(value)
        _set_depth(self.index, self.kind, int(value))

    def _depth_limit(self) -> int:
        if self.kind == "ivf":
            return int(faiss.extract_index_ivf(self.index).nlist)
        return max(EF_SEARCH_STEPS)

    # -- search -----------------------------------------------------------------------------------

    def search(
        self, queries: npt.ArrayLike, k: int, *, exclude: int | npt.ArrayLike | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """The ``k`` nearest gallery items of each query: ``(distances, indices)``, each
        (queries x k), nearest first; distances are L2 (not squared). ``exclude`` gives one
        gallery index per query (or one for all; -1 = none) left out of that query's results,
        for leave-one-out retrieval of gallery items; only that index is dropped, an identical
        vector under another index is still found. ``k`` is capped at the items searchable
        (size, or size - 1 with ``exclude``); an approximate index may find fewer, padded with
        index -1 and distance +inf. A 1-D query gives 1-D results."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        q = as_matrix(queries, "queries", dim=self.dim, allow_vector=True)
        single = np.ndim(queries) == 1
        ex = as_exclude(exclude, len(q), self.size)
        k_out = min(k, self.size - (1 if ex is not None else 0))
        if k_out < 1:
            empty = (np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64))
            return (empty[0][0], empty[1][0]) if single else empty
        # One query (or a few) on one thread: faiss would fan the scan out over OpenMP threads,
        # which costs more than it saves (11 ms vs 1.5 ms for 10k x 512 on 2 busy cores).
        threads = 1 if len(q) < SMALL_BATCH else self.threads
        with thread_limit(threads):
            sq, idx = self.index.search(q, k_out + (1 if ex is not None else 0))
        dist, ids = _finish(sq, idx)
        if ex is not None:
            dist, ids = _drop_excluded(dist, ids, ex, k_out)
        return (dist[0], ids[0]) if single else (dist, ids)

    # -- persistence ------------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "params": self.params,
            "size": self.size,
            "dim": self.dim,
            "metric": "l2",
            "faiss_version": faiss.__version__,
            "build_seconds": round(self.build_seconds, 3),
            "tune_seconds": round(self.tune_seconds, 3),
            "fingerprint": self.fingerprint,
            "index_file": INDEX_FILE,
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss`` then ``index.json`` (with the index file's digest), each
        atomically: a crash leaves an old or a new pair, or a pair ``load`` refuses."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / INDEX_FILE, lambda tmp: faiss.write_index(self.index, str(tmp)))
        meta = self.meta()
        meta["index_bytes"] = (d / INDEX_FILE).stat().st_size
        meta["index_digest"] = _file_digest(d / INDEX_FILE)
        atomic_write_json(d / META_FILE, meta)
        return d

    @classmethod
    def load(cls, directory: str | Path, *, threads: int | None = None) -> RetrievalIndex:
        """Read an index saved by ``save``; ``IndexFileError`` if anything is missing or wrong."""
        d = Path(directory)
        meta = read_meta(d)
        path = d / INDEX_FILE
        if not path.is_file() or path.stat().st_size != meta.get("index_bytes"):
            raise IndexFileError(f"{path} is missing or not the size recorded in {META_FILE}")
        if _file_digest(path) != meta.get("index_digest"):
            raise IndexFileError(f"{path} does not match the digest recorded in {META_FILE}")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise IndexFileError(f"faiss cannot read {path}: {exc}") from exc
        if int(index.ntotal) != meta.get("size") or int(index.d) != meta.get("dim"):
            raise IndexFileError(f"{path} holds {index.ntotal} x {index.d}, {META_FILE} says otherwise")
        return cls(
            index,
            str(meta["kind"]),
            meta.get("params") or {},
            build_seconds=float(meta.get("build_seconds", 0.0)),
            tune_seconds=float(meta.get("tune_seconds", 0.0)),
            fingerprint=meta.get("fingerprint"),
            threads=threads,
        )

    @classmethod
    def load_or_build(
        cls, directory: str | Path, embeddings: npt.ArrayLike, **options: Unpack[BuildOptions]
    ) -> RetrievalIndex:
        """The index saved in ``directory`` if it was built from these embeddings (same size,
        dim, kind and values, and the given ``params``); otherwise build (``options`` as for
        ``build``), save and return a new one. A missing, corrupt or stale saved index is
        rebuilt, never an error."""
        x = as_matrix(embeddings, "embeddings", allow_empty=False)
        kind = resolve_kind(len(x), options.get("kind", "auto"), options.get("exact_threshold", DEFAULT_EXACT_THRESHOLD))
        build: BuildOptions = {**options, "kind": kind}
        index = INDEX.get_at(
            Path(directory),
            lambda: cls.build(x, **build),
            accept=lambda idx: _meta_matches(idx.meta(), x, kind, options.get("params") or {}),
        )
        index.threads = resolve_threads(options.get("threads"))
        return index


def cached_index(es: EmbeddingSet, **options: Unpack[BuildOptions]) -> RetrievalIndex:
    """The retrieval index of a cached embedding set, kept in the disk cache beside it
    (``<identity>/<split>/index/``); ``options`` as for ``RetrievalIndex.build``."""
    return RetrievalIndex.load_or_build(INDEX.path(es.checkpoint_key, es.split), es.embeddings, **options)


def _read_index(directory: Path) -> RetrievalIndex:
    if not (directory / META_FILE).exists():
        raise CacheMiss(f"no {META_FILE}")
    return RetrievalIndex.load(directory)


def _write_index(directory: Path, index: RetrievalIndex) -> None:
    index.save(directory)


# An unsavable index (a read-only cache) is still used, with a warning.
INDEX: DiskCache[RetrievalIndex] = DiskCache(
    "index", FORMAT_VERSION, read=_read_index, write=_write_index, name="index", lock=".index.lock", keep_unsaved=True
)


def read_meta(directory: Path) -> dict[str, Any]:
    """``index.json`` of a saved index; ``IndexFileError`` if missing or unreadable."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise IndexFileError(f"{path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFileError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or meta.get("kind") not in KINDS:
        raise IndexFileError(f"{path} is not an index description this version reads")
    return meta


def _meta_matches(meta: Mapping[str, Any], x: FloatArray, kind: str, params: Mapping[str, Any]) -> bool:
    stored = meta.get("params") or {}
    return (
        meta.get("size") == x.shape[0]
        and meta.get("dim") == x.shape[1]
        and meta.get("kind") == kind
        and all(stored.get(key) == value for key, value in params.items())
        and meta.get("fingerprint") == fingerprint(x)
    )


__all__: Sequence[str] = (
    "APPROX_KIND",
    "DEFAULT_EXACT_THRESHOLD",
    "KINDS",
    "IndexFileError",
    "RetrievalIndex",
    "default_nlist",
    "recall_at_k",
    "resolve_kind",
)
