"""Maps: UMAP fit with a capped sample, placement, disk cache, Procrustes comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest

from das_core.explorer import maps, umap_fit
from das_core.explorer.compare import align_to, displacement, moved_most
from das_core.explorer.maps import get_map
from das_core.explorer.umap_fit import (
    MapParams,
    MapResult,
    fit_map,
    joint_map,
    place_points,
    stratified_sample,
)
from das_core.store.cache import EmbeddingSet


def clustered(n: int, d: int = 16, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d)) * 2.0
    labels = np.sort(rng.integers(0, classes, n))
    x = centers[labels] + rng.normal(scale=0.5, size=(n, d))
    return x.astype(np.float32), labels.astype(np.int64)


def test_fit_map_capped_sample_records_fitted_points() -> None:
    x, y = clustered(600)
    res = fit_map(x, labels=y, params=MapParams(max_fit=400), seed=1)
    assert res.coords.shape == (600, 2) and res.coords.dtype == np.float32
    assert res.fitted.shape == (600,) and res.fitted.dtype == bool
    assert res.n_fitted == 400
    assert np.isfinite(res.coords).all()
    # stratified: every class gets its proportional share of the fitted sample
    for c in range(3):
        share = (y == c).mean() * 400
        assert abs(int(res.fitted[y == c].sum()) - share) <= 1
    assert res.params["max_fit"] == 400 and res.seed == 1
    assert {"umap-learn", "numpy", "numba", "pynndescent", "python"} <= set(res.versions)
    assert "400 of 600" in res.method
    # placing into the fitted points: a fitted point's copy lands on its own position
    fitted = np.flatnonzero(res.fitted)[:5]
    np.testing.assert_array_equal(umap_fit.map_placer(res, x)(x[fitted]), res.coords[fitted])
    # clusters survive: each point's nearest map neighbour mostly has its label
    from das_core.retrieval.knn import EXPLORER_KNN

    _, idx = EXPLORER_KNN(res.coords, res.coords, 2)
    assert (y[idx[:, 1]] == y).mean() > 0.9


def test_fit_map_same_seed_same_layout() -> None:
    x, y = clustered(300, seed=2)
    a = fit_map(x, labels=y, seed=5)
    b = fit_map(x, labels=y, seed=5)
    assert a.fitted.all()
    np.testing.assert_array_equal(a.coords, b.coords)


def test_fit_map_tiny_inputs() -> None:
    assert fit_map(np.zeros((0, 4), np.float32)).coords.shape == (0, 2)
    res = fit_map(np.eye(3, 4, dtype=np.float32))
    assert res.coords.shape == (3, 2) and np.isfinite(res.coords).all()


def test_stratified_sample() -> None:
    y = np.repeat([0, 1, 2], [500, 300, 200])
    s = stratified_sample(1000, 100, y, seed=0)
    assert len(s) == 100 and len(np.unique(s)) == 100 and np.all(np.diff(s) > 0)
    assert np.bincount(y[s]).tolist() == [50, 30, 20]
    np.testing.assert_array_equal(s, stratified_sample(1000, 100, y, seed=0))
    assert len(stratified_sample(10, 50, None, seed=0)) == 10


def test_place_points_copy_lands_exactly_and_midpoint_interpolates() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 8)).astype(np.float32)
    xy = rng.normal(size=(200, 2)).astype(np.float32)
    out = place_points(xy, ref, ref[[3, 17]], k=10)
    np.testing.assert_array_equal(out, xy[[3, 17]])
    # two references: the midpoint is equidistant, so it lands halfway on the map
    two = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    two_xy = np.array([[0.0, 0.0], [4.0, 2.0]], np.float32)
    mid = place_points(two_xy, two, np.array([[0.5, 0.5, 0.0]], np.float32), k=2)
    # both distances are the same float32 arithmetic on exact numbers (0.5, 1, 0): equal weights;
    # the weighted mean of (0, 0) and (4, 2) then rounds a few times at |x| <= 4: < 1e-6 off
    np.testing.assert_allclose(mid, [[2.0, 1.0]], atol=1e-5)
    # closer to the first reference: closer to its map position (inverse-distance weights)
    near = place_points(two_xy, two, np.array([[0.9, 0.1, 0.0]], np.float32), k=2, normalize=False)
    assert 0.0 < near[0, 0] < 2.0
    assert place_points(xy, ref, np.zeros((0, 8), np.float32)).shape == (0, 2)
    with pytest.raises(ValueError):
        place_points(xy, ref, np.zeros((2, 5), np.float32))


def test_get_map_caches_with_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = clustered(300, seed=3)
    es = EmbeddingSet(x, y, ["a", "b", "c"], "test", "synthetic", "k" * 16)
    first = get_map(es, seed=0, params=MapParams(max_fit=250))
    path = maps.map_path(es, seed=0, params=MapParams(max_fit=250).as_dict())
    assert path.is_file() and path.with_suffix(".json").is_file()
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["versions"]["umap-learn"] == first.versions["umap-learn"] and side["seed"] == 0

    def no_fit(*a: object, **k: object) -> MapResult:
        raise AssertionError("refitted instead of reading the cache")

    with monkeypatch.context() as m:  # (not monkeypatch.undo(): that would drop DAS_CACHE_DIR too)
        m.setattr(maps, "fit_map", no_fit)
        again = get_map(es, seed=0, params=MapParams(max_fit=250))
    np.testing.assert_array_equal(again.coords, first.coords)
    np.testing.assert_array_equal(again.fitted, first.fitted)
    assert again.versions == first.versions and again.params == first.params
    assert again.meta["checkpoint_key"] == "k" * 16
    # a truncated file is refitted, not an error
    path.write_bytes(path.read_bytes()[:100])
    refit = get_map(es, seed=0, params=MapParams(max_fit=250))
    np.testing.assert_array_equal(refit.coords, first.coords)


def test_map_result_roundtrip(tmp_path: object) -> None:
    from pathlib import Path

    p = Path(str(tmp_path)) / "m.npz"
    res = MapResult(
        coords=np.arange(10, dtype=np.float32).reshape(5, 2),
        fitted=np.array([1, 0, 1, 0, 1], bool),
        seed=3,
        params={"max_fit": 3},
        versions={"umap-learn": "x"},
        method="test",
        seconds=1.5,
    )
    res.save(p)
    back = MapResult.load(p)
    np.testing.assert_array_equal(back.coords, res.coords)
    np.testing.assert_array_equal(back.fitted, res.fitted)
    assert (back.seed, back.params, back.versions, back.method) == (
        3,
        {"max_fit": 3},
        {"umap-learn": "x"},
        "test",
    )
    p.write_bytes(b"not a zip")
    with pytest.raises(ValueError):
        MapResult.load(p)


def test_joint_map_shapes() -> None:
    x, y = clustered(300, seed=4)
    rng = np.random.default_rng(0)
    produced = x[:60] + rng.normal(scale=0.05, size=(60, x.shape[1])).astype(np.float32)
    r, p = joint_map(x, produced, labels=y, params=MapParams(max_fit=200), seed=0)
    assert r.shape == (300, 2) and p.shape == (60, 2)
    assert np.isfinite(r).all() and np.isfinite(p).all()


def rotate(xy: np.ndarray, theta: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return (xy @ np.array([[c, -s], [s, c]]) * scale + np.array(shift)).astype(np.float32)


def test_align_to_recovers_similarity_transform() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(100, 2)).astype(np.float32)
    b = rotate(a, 1.1, 2.5, (3.0, -7.0))
    # b is exact up to its float32 rounding (|b| < 25: 1.5e-6), which the fit divides by the
    # scale 2.5; Procrustes itself runs in float64 and the result is rounded to float32 once
    # (|a| < 5: 3e-7): < 1e-6 off in all, 1e-4 is far below any wrong rotation or scale
    np.testing.assert_allclose(align_to(a, b), a, atol=1e-4)
    # a mirrored map aligns too (UMAP layouts are defined up to reflection)
    np.testing.assert_allclose(align_to(a, b * np.array([1.0, -1.0], np.float32)), a, atol=1e-4)
    # alignment on a subset of shared rows, applied to every row
    sub = align_to(a[:50], b, pairs=(np.arange(50), np.arange(50)))
    np.testing.assert_allclose(sub, a, atol=1e-4)


def test_moved_most_finds_displaced_points() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(200, 2)).astype(np.float32)
    b = rotate(a, -0.4, 0.3, (10.0, 1.0))
    moved = np.array([5, 50, 120, 199])
    b[moved] += np.array([3.0, -2.0], np.float32)
    assert set(moved_most(a, b, k=4).tolist()) == set(moved.tolist())
    d = displacement(a, b)
    # an exact similarity transform but for float32 rounding (~1e-6) and 4 movers displaced by
    # |(3, -2)| / 0.3 = 12 in a's units: the thresholds sit orders of magnitude from both
    assert d.shape == (200,) and np.median(d) < 0.1 < d[moved].min()


def test_placer_reuses_its_index() -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(300, 6)).astype(np.float32)
    xy = rng.normal(size=(300, 2)).astype(np.float32)
    new = rng.normal(size=(20, 6)).astype(np.float32)
    placer = umap_fit.Placer(xy, ref, k=5)
    np.testing.assert_array_equal(placer(new), place_points(xy, ref, new, k=5))
    np.testing.assert_array_equal(placer(new[:3]), place_points(xy, ref, new[:3], k=5))


def test_fuzzy_graph_matches_umap() -> None:
    import warnings

    from das_core.explorer.umap_fit import fuzzy_graph
    from das_core.retrieval.knn import EXPLORER_KNN, l2_normalize

    x, _ = clustered(200, seed=6)
    x = l2_normalize(x)
    dist, idx = EXPLORER_KNN(x, x, 10)
    ours = fuzzy_graph(idx, dist).tocsr()
    assert abs(ours - ours.T).max() == 0  # symmetric
    assert ours.max() <= 1.0 and ours.min() >= 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from umap.umap_ import fuzzy_simplicial_set

        theirs, _, _ = fuzzy_simplicial_set(
            x, 10, np.random.RandomState(0), "euclidean", knn_indices=idx, knn_dists=dist
        )
    # umap stops its bisection for sigma_i once |Σ_j w_ij - log2(k)| < SMOOTH_K_TOLERANCE = 1e-5
    # (ours runs to convergence). Every w_ij grows with sigma_i, so no single weight moves more
    # than the sum: |Δw_ij| <= 1e-5. The union a + b - ab moves by <= |Δa| + |Δb| <= 2e-5, and
    # umap keeps sigma and the weights in float32 (~1e-7 more).
    from umap.umap_ import SMOOTH_K_TOLERANCE

    assert abs(ours - theirs.tocsr()).max() <= 2 * SMOOTH_K_TOLERANCE + 1e-6
