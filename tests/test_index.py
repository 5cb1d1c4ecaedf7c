"""The retrieval index: exact = brute force, leave-one-out, persistence, kind choice, recall."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from das_core.retrieval import index as index_mod
from das_core.retrieval.index import APPROX_KIND, RetrievalIndex, recall_at_k
from das_core.retrieval.knn import L2_KNN


def clustered(n: int, dim: int, classes: int, seed: int = 0, spread: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    x = centres[rng.integers(0, classes, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.sqrt(((q[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1))
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, axis=1), idx


def faiss_sq_error(q: np.ndarray, x: np.ndarray) -> float:
    """Bound on the rounding of a squared L2 distance faiss computes in float32 as
    |q|^2 + |g|^2 - 2 q.g (d + 2 terms, summed in whatever order its BLAS or SIMD kernel
    uses): (d + 2)·2^-24·(|q| + |g|)^2; 6.2e-6 for the unit vectors here."""
    scale = float(np.linalg.norm(q, axis=-1).max() + np.linalg.norm(x, axis=-1).max())
    return (x.shape[1] + 2) * 2.0**-24 * scale**2


def assert_decided_in_float32(x: np.ndarray, q: np.ndarray, k: int) -> None:
    """Premise of comparing faiss's neighbour ids with the float64 brute force: within each
    query's k + 1 nearest, consecutive squared distances are more than twice faiss's error
    apart, so any kernel orders them the same (exact duplicates tie exactly and go by index)."""
    d2 = np.sort(((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1), axis=1)[:, : k + 1]
    gaps = np.diff(d2, axis=1)
    assert ((gaps == 0) | (gaps > 2 * faiss_sq_error(q, x))).all(), "fixture has a float32 near-tie"


@pytest.fixture()
def gallery() -> np.ndarray:
    return clustered(1500, 24, classes=30, seed=1)


def test_exact_index_equals_brute_force(gallery: np.ndarray) -> None:
    queries = clustered(40, 24, classes=30, seed=2)
    idx = RetrievalIndex.build(gallery, kind="flat")
    dist, ids = idx.search(queries, 7)
    ref_d, ref_i = brute_force(gallery, queries, 7)
    assert ids.dtype == np.int64 and dist.dtype == np.float32 and ids.shape == (40, 7)
    assert_decided_in_float32(gallery, queries, 7)
    np.testing.assert_array_equal(ids, ref_i)
    # L2, not squared: a squared error e moves the distance r by <= e / (2r) (r >= 0.05 here),
    # plus float32 sqrt's half-ulp
    err = faiss_sq_error(queries, gallery)
    assert ref_d.min() > 0.05
    tol = err / (2 * ref_d) + 2.0**-24 * ref_d
    assert (np.abs(dist - ref_d) <= tol).all()  # L2, not squared
    # a single 1-D query gives 1-D results, the same as its row (faiss scans one query with its
    # SIMD kernel and a batch with BLAS: different roundings, each within the bound above)
    d1, i1 = idx.search(queries[3], 7)
    assert i1.shape == (7,)
    np.testing.assert_array_equal(i1, ids[3])
    assert (np.abs(d1 - ref_d[3]) <= tol[3]).all()
    # the index-free exact search agrees too
    np.testing.assert_array_equal(L2_KNN(queries, gallery, 7)[1], ref_i)


def test_k_is_capped_and_bad_input_refused(gallery: np.ndarray) -> None:
    small = RetrievalIndex.build(gallery[:5])
    assert small.search(gallery[0], 50)[1].shape == (5,)
    assert small.search(gallery[0], 50, exclude=0)[1].shape == (4,)
    with pytest.raises(ValueError, match="shape"):
        small.search(np.zeros(3, np.float32), 2)
    with pytest.raises(ValueError, match="k must"):
        small.search(gallery[0], 0)
    with pytest.raises(ValueError, match="NaN"):
        RetrievalIndex.build(np.full((4, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="kind"):
        RetrievalIndex.build(gallery, kind="lsh")


def test_leave_one_out_excludes_by_index_only(gallery: np.ndarray) -> None:
    x = gallery.copy()
    x[10] = x[20]  # an exact duplicate under another index
    x[30] = x[20]
    idx = RetrievalIndex.build(x, kind="flat")
    queries = np.arange(len(x))
    dist, ids = idx.search(x, 5, exclude=queries)
    assert ids.shape == (len(x), 5)
    assert not (ids == queries[:, None]).any()  # never the query itself
    assert set(ids[20, :2].tolist()) == {10, 30}  # but its duplicates, at distance 0
    # ... up to faiss's rounding: |q|^2 + |g|^2 - 2 q.g of identical vectors is 0 only up to
    # faiss_sq_error (the norms and the BLAS dot product sum in different orders), and
    # sqrt(6.2e-6) = 2.5e-3
    np.testing.assert_allclose(dist[20, :2], 0.0, atol=np.sqrt(faiss_sq_error(x, x)))
    # the other results are the brute-force neighbours minus the query
    assert_decided_in_float32(x, x[:50], 6)
    ref_i = brute_force(x, x[:50], 6)[1]
    for q in range(50):
        if q in (10, 20, 30):
            continue
        expected = [i for i in ref_i[q] if i != q][:5]
        assert ids[q].tolist() == expected
    # one index for a single query; -1 excludes nothing
    assert 20 not in idx.search(x[20], 3, exclude=20)[1].tolist()
    assert idx.search(x[:3], 1, exclude=[-1, -1, -1])[1][:, 0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="one gallery index per query"):
        idx.search(x[:3], 2, exclude=[1, 2])


def test_save_load_round_trip(tmp_path: Path, gallery: np.ndarray) -> None:
    queries = clustered(25, 24, classes=30, seed=3)
    for kind in ("flat", "ivf", "hnsw"):
        built = RetrievalIndex.build(gallery, kind=kind)
        built.save(tmp_path / kind)
        loaded = RetrievalIndex.load(tmp_path / kind)
        assert (loaded.kind, loaded.size, loaded.dim, loaded.params) == (kind, 1500, 24, built.params)
        for a, b in zip(built.search(queries, 10), loaded.search(queries, 10), strict=True):
            np.testing.assert_array_equal(a, b)
        meta = json.loads((tmp_path / kind / "index.json").read_text())
        assert {"kind", "params", "size", "dim", "faiss_version", "build_seconds"} <= set(meta)
        assert not [p for p in (tmp_path / kind).iterdir() if p.name.endswith(".tmp")]


class CountBuilds:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = RetrievalIndex.build.__func__  # type: ignore[attr-defined]

        def counted(cls: type[RetrievalIndex], *args: object, **kwargs: object) -> RetrievalIndex:
            self.count += 1
            return original(cls, *args, **kwargs)  # type: ignore[no-any-return]

        monkeypatch.setattr(RetrievalIndex, "build", classmethod(counted))


def test_load_or_build_reuses_a_valid_index(tmp_path: Path, gallery: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    builds = CountBuilds(monkeypatch)
    d = tmp_path / "idx"
    first = RetrievalIndex.load_or_build(d, gallery)
    assert builds.count == 1 and (d / "index.json").is_file()
    again = RetrievalIndex.load_or_build(d, gallery)
    assert builds.count == 1  # reloaded, not rebuilt
    np.testing.assert_array_equal(first.search(gallery[:5], 4)[1], again.search(gallery[:5], 4)[1])


@pytest.mark.parametrize(
    "damage",
    ["truncate", "garbage", "flip-byte", "delete-index", "bad-json", "delete-json"],
)
def test_load_or_build_rebuilds_a_corrupt_index(
    tmp_path: Path, gallery: np.ndarray, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    d = tmp_path / "idx"
    RetrievalIndex.load_or_build(d, gallery, kind="ivf")
    builds = CountBuilds(monkeypatch)
    f = d / "index.faiss"
    raw = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        f.write_bytes(b"\x00garbage" * 100)
    elif damage == "flip-byte":
        f.write_bytes(raw[:200] + bytes([raw[200] ^ 0xFF]) + raw[201:])
    elif damage == "delete-index":
        f.unlink()
    elif damage == "bad-json":
        (d / "index.json").write_text("{not json")
    else:
        (d / "index.json").unlink()
    with pytest.raises(index_mod.IndexFileError):
        RetrievalIndex.load(d)
    rebuilt = RetrievalIndex.load_or_build(d, gallery, kind="ivf")
    assert builds.count == 1 and rebuilt.size == len(gallery)
    RetrievalIndex.load_or_build(d, gallery, kind="ivf")  # the rebuilt one was saved
    assert builds.count == 1


def test_load_or_build_rebuilds_when_the_gallery_changed(
    tmp_path: Path, gallery: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = CountBuilds(monkeypatch)
    d = tmp_path / "idx"
    RetrievalIndex.load_or_build(d, gallery)
    bigger = RetrievalIndex.load_or_build(d, np.concatenate([gallery, gallery[:10]]))
    assert builds.count == 2 and bigger.size == len(gallery) + 10
    moved = np.concatenate([gallery, gallery[:10]])
    moved[0] = moved[1]  # same size and dim, other values (e.g. a retrained model)
    RetrievalIndex.load_or_build(d, moved)
    assert builds.count == 3
    RetrievalIndex.load_or_build(d, moved, kind="hnsw")  # another kind
    assert builds.count == 4
    RetrievalIndex.load_or_build(d, moved, kind="hnsw", params={"M": 8})  # other parameters
    assert builds.count == 5


def test_auto_picks_exact_below_the_threshold_and_approximate_above(gallery: np.ndarray) -> None:
    assert RetrievalIndex.build(gallery, exact_threshold=1500).kind == "flat"
    approx = RetrievalIndex.build(gallery, exact_threshold=1499)
    assert approx.kind == APPROX_KIND
    depth = approx.search_depth
    assert depth is not None and depth[0] in approx.params
    assert RetrievalIndex.build(gallery, kind="hnsw", exact_threshold=10**9).kind == "hnsw"


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_at_10(kind: str) -> None:
    data = clustered(6200, 32, classes=60, seed=4)
    x, queries = data[:6000], data[6000:]  # queries: new items of the same classes
    idx = RetrievalIndex.build(x, kind=kind, target_recall=0.95)
    truth = L2_KNN(queries, x, 10)[1]
    recall = recall_at_k(idx.search(queries, 10)[1], truth)
    # a property, not a value: the index is tuned to recall 0.95 on its own sample (graph and
    # clustering may differ per machine and thread count); held-out queries of the same classes
    # must keep most of it. The exact truth (L2_KNN) is decided in float32 too, but a
    # swapped near-tie moves one of 200 × 10 hits, 5e-4 of recall.
    assert recall >= 0.9, (recall, idx.params)
    assert idx.params["tuned_recall@10"] >= 0.9
    if kind == "ivf":
        assert idx.params["nlist"] == index_mod.default_nlist(6000)


def test_threads_are_set_for_each_call_and_restored(gallery: np.ndarray) -> None:
    """Each index searches on its own thread count (one for a single query), and the process's
    count is restored after: faiss shares torch's OpenMP runtime, so a leaked one-thread
    setting would slow (and change the float sums of) every later torch op."""
    import faiss
    import torch

    before = torch.get_num_threads()
    idx1 = RetrievalIndex.build(gallery, threads=1)
    idx2 = RetrievalIndex.build(gallery, threads=2)
    assert idx1.threads == 1 and idx2.threads == 2
    assert torch.get_num_threads() == before

    seen: list[int] = []

    class Spy:
        def __init__(self, inner: faiss.Index) -> None:
            self.inner = inner

        def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            seen.append(faiss.omp_get_max_threads())
            return self.inner.search(q, k)

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

    for idx in (idx1, idx2):
        idx.index = Spy(idx.index)  # type: ignore[assignment]
    idx1.search(gallery[:100], 3)
    idx2.search(gallery[:100], 3)
    idx2.search(gallery[0], 3)
    assert seen == [1, 2, 1]
    assert torch.get_num_threads() == before and faiss.omp_get_max_threads() == before
