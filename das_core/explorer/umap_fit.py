"""2-D maps of an embedding space (UMAP), out-of-sample placement, and map comparison.

A map is fitted once per checkpoint and split (``das_core.explorer.maps.get_map``, cached on disk with its seed and
library versions, because UMAP layouts vary across library versions and thread counts even
with a seed). Large splits are fitted on a capped, label-stratified sample and the other
points are *placed* into the fitted map (``place_points``); DAS-produced embeddings are
placed the same way, so moving a slider never refits. ``MapResult.fitted`` records which
points UMAP saw.

Placement pulls new points onto the existing clusters, so a produced point can look more
realistic on the map than it is: ``das_core.explorer.analysis.produced_honesty`` measures that in the
original space, and ``joint_map`` is the honest (slow) alternative, one fit on real and
produced points together.

How a map is fitted: the exact k-nearest-neighbour graph (faiss) and UMAP's fuzzy simplicial
set (``fuzzy_graph``, numpy) are computed here, and umap-learn's ``simplicial_set_embedding``
lays the graph out (spectral initialisation, then UMAP's optimisation). That is what
``umap.UMAP(random_state=seed).fit`` does, minus pynndescent's approximate neighbours and
umap's numba graph code, whose compilation costs tens of seconds in every fresh process. The
layout runs single-threaded (``parallel=False``, the equivalent of ``n_jobs=1``): a fixed
``random_state`` makes umap-learn single-threaded anyway, and one thread keeps layouts
reproducible. The faiss search uses the OpenMP threads (``OMP_NUM_THREADS``); it is exact,
so the thread count does not change its result. umap and faiss are imported lazily, so
importing this module is cheap (the app's first paint).
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from das_core.arrays import as_matrix
from das_core.retrieval.knn import EXPLORER_KNN, l2_normalize
from das_core.store.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)


MapProgress = Callable[[float, str], None]


"""``progress(fraction in [0, 1], message)``, e.g. Streamlit's ``bar.progress``."""


# Points UMAP is fitted on at most; the others are placed. Chosen by measurement
# (bench/bench_projection.py, bench/results/projection.json; 2-core AMD EPYC, one thread):
# on 35,000 demo-like 128-d points a map takes 3.5 / 7.2 / 10.3 / 14.4 / 26.2 s with
# max_fit 5k / 10k / 15k / 20k / all, for a map quality (10-NN label agreement on the map)
# of 0.927 / 0.941 / 0.943 / 0.950 / 0.958. 10k keeps nearly all the quality; with the
# import of umap (~3 s) and its one-time compilation (~1.5 s), a cold demo map costs
# ~12 s beyond embedding the split (which on this CPU is ~25 s by itself for 35,000 images).
DEFAULT_MAX_FIT = 10_000


DEFAULT_N_NEIGHBORS = 15


DEFAULT_MIN_DIST = 0.1


DEFAULT_PLACE_K = 10


# Optimisation epochs (umap-learn's own default is 500 up to 10,000 points, else 200).
DEFAULT_N_EPOCHS: int | None = 200


UMAP_N_JOBS = 1  # recorded in the params: the layout is single-threaded (parallel=False)


MAP_FORMAT = 1


# Below this many points UMAP is not used (its spectral initialisation and neighbour graph
# need a handful of points); the map is the first two principal components instead.
_MIN_UMAP_POINTS = 8


_state = {"layout_compiled": False}  # whether umap's numba layout ran in this process



@dataclass(frozen=True)
class MapParams:
    """How a map is fitted, one frozen object instead of the same keyword list in every
    function (``fit_map``, ``joint_map``, ``get_map``, ``explorer_map``). ``as_dict()`` is what
    a ``MapResult`` records and what the map cache's key hashes."""

    max_fit: int = DEFAULT_MAX_FIT
    n_neighbors: int = DEFAULT_N_NEIGHBORS
    min_dist: float = DEFAULT_MIN_DIST
    place_k: int = DEFAULT_PLACE_K
    n_epochs: int | None = DEFAULT_N_EPOCHS

    def __post_init__(self) -> None:
        if self.max_fit < 1:
            raise ValueError(f"max_fit must be >= 1, got {self.max_fit}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_epochs": None if self.n_epochs is None else int(self.n_epochs),
            "n_neighbors": int(self.n_neighbors),
            "min_dist": float(self.min_dist),
            "max_fit": int(self.max_fit),
            "metric": "euclidean (L2-normalised)",
            "place_k": int(self.place_k),
            "n_jobs": UMAP_N_JOBS,
        }


@dataclass
class MapResult:
    """A 2-D map of ``N`` points and how it was made."""

    coords: np.ndarray  # (N, 2) float32
    fitted: np.ndarray  # (N,) bool: the points UMAP was fitted on (the others were placed)
    seed: int
    params: dict[str, Any]  # n_neighbors, min_dist, max_fit, metric, place_k, n_jobs
    versions: dict[str, str]  # umap-learn, numpy, numba, pynndescent, python
    method: str
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def n_fitted(self) -> int:
        return int(self.fitted.sum())

    def _meta(self) -> dict[str, Any]:
        return {
            "format": MAP_FORMAT,
            "n": len(self),
            "seed": self.seed,
            "params": self.params,
            "versions": self.versions,
            "method": self.method,
            "seconds": self.seconds,
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (``.npz``: coordinates, fitted mask and the metadata) and a readable
        ``.json`` sidecar beside it, both atomically. The ``.npz`` alone is authoritative."""
        p = Path(path)
        meta = self._meta()
        coords = np.ascontiguousarray(self.coords, dtype=np.float32)
        fitted = np.ascontiguousarray(self.fitted, dtype=bool)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, coords=coords, fitted=fitted, meta=np.array(json.dumps(meta, sort_keys=True)))

        atomic_write(p, write)
        atomic_write_json(p.with_suffix(".json"), meta)
        return p

    @classmethod
    def load(cls, path: str | Path) -> MapResult:
        """Read a map written by ``save``; raises ``ValueError`` when it is missing a part or
        inconsistent, ``OSError`` when unreadable."""
        p = Path(path)
        try:
            with np.load(p, allow_pickle=False) as z:
                coords = np.asarray(z["coords"], dtype=np.float32)
                fitted = np.asarray(z["fitted"], dtype=bool)
                meta = json.loads(str(z["meta"]))
        except (KeyError, EOFError, json.JSONDecodeError) as exc:
            raise ValueError(f"{p}: not a complete map file ({exc})") from exc
        except Exception as exc:  # zipfile.BadZipFile and friends
            if isinstance(exc, OSError):
                raise
            raise ValueError(f"{p}: not a readable map file ({exc})") from exc
        n = int(meta.get("n", -1))
        if meta.get("format") != MAP_FORMAT or coords.shape != (n, 2) or fitted.shape != (n,):
            raise ValueError(
                f"{p}: inconsistent map file (coords {coords.shape}, fitted {fitted.shape}, n {n})"
            )
        if not np.isfinite(coords).all():
            raise ValueError(f"{p}: map coordinates are not finite")
        return cls(
            coords=coords,
            fitted=fitted,
            seed=int(meta["seed"]),
            params=dict(meta["params"]),
            versions=dict(meta["versions"]),
            method=str(meta["method"]),
            seconds=float(meta["seconds"]),
            meta=dict(meta.get("meta") or {}),
        )


def library_versions() -> dict[str, str]:
    """Versions that can change a map (umap-learn, numpy, numba, pynndescent, scipy, faiss,
    python), read once per process without importing the libraries."""
    return dict(_library_versions())


@functools.cache
def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("umap-learn", "numpy", "numba", "pynndescent", "scipy", "scikit-learn", "faiss-cpu"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "absent"
    return out


def stratified_sample(n: int, size: int, labels: np.ndarray | None, seed: int) -> np.ndarray:
    """``size`` distinct indices of ``range(n)``, sorted, drawn with ``seed``; with labels,
    every class gets its proportional share (largest-remainder rounding)."""
    size = min(int(size), n)
    rng = np.random.default_rng(seed)
    if size >= n:
        return np.arange(n, dtype=np.int64)
    if labels is None:
        return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)
    labels = np.asarray(labels)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = counts * (size / n)
    quota = np.floor(exact).astype(np.int64)
    short = size - int(quota.sum())
    if short > 0:
        quota[np.argsort(-(exact - quota), kind="stable")[:short]] += 1
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    picks = [
        rng.choice(order[s : s + c], size=q, replace=False)
        for s, c, q in zip(starts, counts, quota, strict=True)
        if q > 0
    ]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def _pca2(x: np.ndarray) -> np.ndarray:
    if x.shape[0] < 2:
        return np.zeros((x.shape[0], 2), np.float32)
    c = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    out = np.zeros((c.shape[0], 2), np.float32)
    comps = c @ vt[:2].T
    out[:, : comps.shape[1]] = comps
    return out


def fuzzy_graph(knn_idx: np.ndarray, knn_dist: np.ndarray) -> Any:
    """UMAP's fuzzy simplicial set of a k-nearest-neighbour graph, vectorised in numpy (the
    algorithm of McInnes et al. 2018, with umap-learn's defaults: local connectivity 1,
    bandwidth 1, fuzzy union). Returns a symmetric ``scipy.sparse`` COO matrix.

    For point ``i`` with neighbour distances ``d_ij`` (column 0 is the point itself):
    ``rho_i`` = the smallest non-zero distance, ``sigma_i`` by bisection so that
    ``Σ_{j≥1} exp(−max(0, d_ij − rho_i) / sigma_i) = log2(k)`` (floored at 1e-3 × the mean
    neighbour distance), edge weights ``w_ij = exp(−max(0, d_ij − rho_i) / sigma_i)`` (0 for
    the point itself), then ``W + Wᵀ − W ∘ Wᵀ``.
    """
    import scipy.sparse as sp

    idx = np.asarray(knn_idx, dtype=np.int64)
    dist = np.asarray(knn_dist, dtype=np.float64)
    n, k = idx.shape
    d = dist[:, 1:]
    positive = np.where(d > 0, d, np.inf)
    rho = positive.min(axis=1) if d.shape[1] else np.zeros(n)
    rho[~np.isfinite(rho)] = 0.0
    excess = np.maximum(d - rho[:, None], 0.0)
    target = np.log2(k)
    lo, hi, sigma = np.zeros(n), np.full(n, np.inf), np.ones(n)
    for _ in range(64):
        psum = np.exp(-excess / sigma[:, None]).sum(axis=1)
        above = psum > target
        hi = np.where(above, sigma, hi)
        lo = np.where(above, lo, sigma)
        sigma = np.where(np.isinf(hi), sigma * 2.0, 0.5 * (lo + hi))
    floor = 1e-3 * np.where(rho > 0, dist.mean(axis=1), dist.mean())
    sigma = np.maximum(sigma, floor)
    w = np.exp(-np.maximum(dist - rho[:, None], 0.0) / sigma[:, None])
    w[idx == np.arange(n)[:, None]] = 0.0
    rows = np.repeat(np.arange(n), k)
    g = sp.csr_matrix((w.ravel(), (rows, idx.ravel())), shape=(n, n))
    gt = g.T.tocsr()
    sym = (g + gt - g.multiply(gt)).tocoo()
    sym.eliminate_zeros()
    return sym


def _umap_fit(
    x: np.ndarray, *, seed: int, n_neighbors: int, min_dist: float, n_epochs: int | None
) -> np.ndarray:
    """UMAP 2-D layout of the rows of ``x`` (float32, already normalised).

    The exact k-nearest-neighbour graph (faiss) and its fuzzy simplicial set
    (``fuzzy_graph``, numpy) are computed here; umap-learn's ``simplicial_set_embedding``
    (spectral initialisation, then the UMAP cross-entropy optimisation) lays it out. This
    skips pynndescent's approximate search and umap's numba graph functions, whose
    compilation costs tens of seconds in every fresh process, and gives the exact graph.
    """
    n = x.shape[0]
    if n < _MIN_UMAP_POINTS:
        return _pca2(x)
    k = max(2, min(int(n_neighbors), n - 1))
    knn_dist, knn_idx = EXPLORER_KNN(x, x, k)
    graph = fuzzy_graph(knn_idx, knn_dist)
    epochs = int(n_epochs) if n_epochs is not None else (500 if n <= 10_000 else 200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba/pynndescent/spectral notices
        from umap.umap_ import find_ab_params, simplicial_set_embedding

        a, b = find_ab_params(1.0, float(min_dist))
        coords, _ = simplicial_set_embedding(
            x,
            graph,
            2,  # n_components
            1.0,  # initial_alpha (learning rate)
            a,
            b,
            1.0,  # gamma (repulsion strength)
            5,  # negative_sample_rate
            epochs,
            "spectral",
            np.random.RandomState(int(seed)),
            "euclidean",
            {},
            False,  # densmap
            {},
            False,  # output_dens
            parallel=False,
            verbose=False,
        )
    _state["layout_compiled"] = True
    return np.ascontiguousarray(coords, dtype=np.float32)


class Placer:
    """Places new embeddings into an existing map (``place_points``), with the reference
    index built once: keep one per map and call it on every slider move.

    Each new point goes to the inverse-distance-weighted average of the map positions of its
    ``k`` nearest reference points, the neighbours found in the original embedding space
    (exact faiss search, on L2-normalised vectors when ``normalize``, as ``fit_map`` fits).
    A new point identical to a reference point lands exactly on it. This is the
    initialisation ``UMAP.transform`` starts from (without its optimisation epochs); like it,
    it can only put points *on or between existing clusters*: a produced embedding far from
    every real one still lands next to its nearest real neighbours and looks realistic on the
    map. Judge produced points by ``das_core.explorer.analysis.produced_honesty`` (original space)
    or by ``joint_map``, not by their placed position alone.
    """

    def __init__(
        self,
        map_coords: np.ndarray,
        reference_embeddings: np.ndarray,
        *,
        k: int = DEFAULT_PLACE_K,
        normalize: bool = True,
    ) -> None:
        ref = as_matrix(reference_embeddings, "reference_embeddings")
        self.coords = np.ascontiguousarray(map_coords, dtype=np.float32)
        if self.coords.shape != (ref.shape[0], 2):
            raise ValueError(
                f"map_coords must be ({ref.shape[0]}, 2) to match the references, got {self.coords.shape}"
            )
        self.k = max(1, int(k))
        self.normalize = normalize
        self.knn = EXPLORER_KNN.index(l2_normalize(ref) if normalize else ref)

    @property
    def dim(self) -> int:
        return self.knn.dim

    def __call__(self, new_embeddings: np.ndarray) -> np.ndarray:
        """``(M, 2)`` map positions of ``new_embeddings`` ``(M, d)``."""
        new = as_matrix(new_embeddings, "new_embeddings")
        if new.shape[1] != self.dim:
            raise ValueError(f"new embeddings are {new.shape[1]}-d but the references are {self.dim}-d")
        if new.shape[0] == 0:
            return np.zeros((0, 2), np.float32)
        if len(self.knn) == 0:
            raise ValueError("cannot place points into an empty map")
        dist, idx = self.knn.search(l2_normalize(new) if self.normalize else new, self.k)
        exact = dist <= 1e-7
        with np.errstate(divide="ignore"):
            w = np.where(exact.any(axis=1, keepdims=True), exact.astype(np.float32), 1.0 / dist)
        w /= w.sum(axis=1, keepdims=True)
        out: np.ndarray = np.einsum("mk,mkc->mc", w, self.coords[idx]).astype(np.float32)
        return out


def map_placer(result: MapResult, embeddings: np.ndarray) -> Placer:
    """A ``Placer`` into ``result``'s map whose references are the points UMAP was fitted on
    (``embeddings`` are the map's own ``N`` embeddings), as ``UMAP.transform`` only knows its
    training points. Fewer references than all ``N`` points: faster (1,000 produced points
    into the demo map: ~50 ms instead of ~170 ms), and no placement built on placed points."""
    emb = np.asarray(embeddings)
    if emb.shape[0] != len(result):
        raise ValueError(f"the map has {len(result)} points but {emb.shape[0]} embeddings were given")
    k = int(result.params.get("place_k", DEFAULT_PLACE_K))
    return Placer(result.coords[result.fitted], emb[result.fitted], k=k)


def place_points(
    map_coords: np.ndarray,
    reference_embeddings: np.ndarray,
    new_embeddings: np.ndarray,
    *,
    k: int = DEFAULT_PLACE_K,
    normalize: bool = True,
) -> np.ndarray:
    """Positions ``(M, 2)`` for new embeddings in an existing map, without refitting: each
    goes to the inverse-distance-weighted average of the map positions of its ``k`` nearest
    reference points, found in the original embedding space (exact faiss search, on
    L2-normalised vectors when ``normalize``, as ``fit_map`` fits); a copy of a reference
    point lands exactly on it.

    This is the initialisation ``UMAP.transform`` starts from. It pulls new points onto the
    existing clusters: a produced embedding far from every real one still lands among its
    nearest real neighbours and looks realistic on the map, so show
    ``das_core.explorer.analysis.produced_honesty`` (original space) beside it, or use ``joint_map``.
    For repeated calls against the same map, keep a ``Placer`` (index built once).
    """
    return Placer(map_coords, reference_embeddings, k=k, normalize=normalize)(new_embeddings)


def _fit_indices(
    x: np.ndarray,
    fit_idx: np.ndarray,
    *,
    seed: int,
    params: MapParams,
    progress: MapProgress | None,
) -> np.ndarray:
    n = x.shape[0]
    if progress is not None:
        first = "" if _state["layout_compiled"] else " (the first map since start also compiles UMAP, ~10 s)"
        progress(0.05, f"fitting UMAP on {len(fit_idx):,} of {n:,} points{first}")
    coords = np.zeros((n, 2), np.float32)
    coords[fit_idx] = _umap_fit(
        x[fit_idx], seed=seed, n_neighbors=params.n_neighbors, min_dist=params.min_dist, n_epochs=params.n_epochs
    )
    rest = np.setdiff1d(np.arange(n), fit_idx, assume_unique=True)
    if len(rest):
        if progress is not None:
            progress(0.9, f"placing the other {len(rest):,} points")
        coords[rest] = place_points(coords[fit_idx], x[fit_idx], x[rest], k=params.place_k, normalize=False)
    return coords


def _method_text(n: int, n_fit: int, seed: int, params: MapParams) -> str:
    n_neighbors, min_dist, place_k, n_epochs = params.n_neighbors, params.min_dist, params.place_k, params.n_epochs
    if n < _MIN_UMAP_POINTS:
        return f"first two principal components of {n} L2-normalised embeddings (too few points for UMAP)"
    text = (
        f"UMAP (2-D, euclidean on L2-normalised embeddings, exact {n_neighbors}-NN graph, min_dist={min_dist}, "
        f"{n_epochs if n_epochs is not None else 'default'} epochs, umap-learn's layout with random_state={seed}, "
        "single-threaded) fitted on "
    )
    if n_fit >= n:
        return text + f"all {n:,} points"
    return text + (
        f"a label-stratified random sample of {n_fit:,} of {n:,} points; the other {n - n_fit:,} were "
        f"placed at the inverse-distance-weighted mean of their {place_k} nearest fitted neighbours "
        "(original space)"
    )


def fit_map(
    embeddings: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    seed: int = 0,
    params: MapParams = MapParams(),
    progress: MapProgress | None = None,
) -> MapResult:
    """A 2-D UMAP map of ``embeddings`` (euclidean on the L2-normalised rows,
    ``random_state=seed``, single-threaded so that a seed gives the same layout).

    With more than ``max_fit`` points, UMAP is fitted on a seeded random sample of
    ``max_fit`` of them (stratified by ``labels`` when given) and the others are placed with
    ``place_points``; ``MapResult.fitted`` says which. ``progress(fraction, message)``.
    """
    t0 = time.perf_counter()
    x = l2_normalize(as_matrix(embeddings, "embeddings"))
    n = x.shape[0]
    if labels is not None and np.asarray(labels).shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {np.asarray(labels).shape}")
    fit_idx = stratified_sample(n, params.max_fit, labels, seed)
    coords = _fit_indices(
        x,
        fit_idx,
        seed=seed,
        params=params,
        progress=progress,
    )
    fitted = np.zeros(n, dtype=bool)
    fitted[fit_idx] = True
    if progress is not None:
        progress(1.0, "map ready")
    return MapResult(
        coords=coords,
        fitted=fitted,
        seed=int(seed),
        params=params.as_dict(),
        versions=library_versions(),
        method=_method_text(n, len(fit_idx), seed, params),
        seconds=round(time.perf_counter() - t0, 3),
    )



def joint_map(
    real: np.ndarray,
    produced: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    seed: int = 0,
    params: MapParams = MapParams(),
    progress: MapProgress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(real_coords, produced_coords)`` of one UMAP fit on real ∪ produced embeddings: the
    honest view, where produced points shape the map instead of being pulled onto it.

    Capped like ``fit_map``: at most ``max_fit`` points are fitted. The produced points are
    all fitted whenever they fit beside a real sample of ``min(N, max(max_fit − M,
    max_fit // 4))`` points (stratified by ``labels``); otherwise a seeded sample of them is,
    and every point not fitted is placed."""
    r = l2_normalize(as_matrix(real, "real"))
    p = l2_normalize(as_matrix(produced, "produced"))
    if r.shape[1] != p.shape[1] and p.shape[0]:
        raise ValueError(f"produced embeddings are {p.shape[1]}-d but the real ones are {r.shape[1]}-d")
    n, m = r.shape[0], p.shape[0]
    max_fit = params.max_fit
    n_real_fit = min(n, max(max_fit - m, max_fit // 4))
    n_prod_fit = min(m, max_fit - n_real_fit)
    real_idx = stratified_sample(n, n_real_fit, labels, seed)
    prod_idx = stratified_sample(m, n_prod_fit, None, seed + 1)
    x = np.concatenate([r, p.reshape(-1, r.shape[1])])
    fit_idx = np.concatenate([real_idx, n + prod_idx])
    coords = _fit_indices(
        x,
        fit_idx,
        seed=seed,
        params=params,
        progress=progress,
    )
    if progress is not None:
        progress(1.0, "joint map ready")
    return coords[:n], coords[n:]


def warm_up() -> float:
    """Import umap and compile its numba functions on a tiny fit (the first call of a fresh
    install compiles for tens of seconds; numba then caches to disk). Returns seconds. The app
    can run this in a background thread at start-up."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    fit_map(x, seed=0, params=MapParams(n_neighbors=5))
    place_points(np.zeros((64, 2), np.float32), x, x[:2])
    return time.perf_counter() - t0
