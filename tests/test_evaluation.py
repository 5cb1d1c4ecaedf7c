"""Tests of das_core.retrieval.evaluation against plain brute-force references and pytorch-metric-learning."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import faiss
import numpy as np
import pytest
import torch

from das_core.retrieval import knn
from das_core.retrieval.evaluation import evaluate_embeddings, kmeans_labels, nmi, pair_f1
from das_core.retrieval.knn import ExactKnn

KS = (1, 2, 4, 8)
RETRIEVAL_KEYS = [f"R@{k}" for k in KS] + ["MAP@R", "RP"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    old_faiss, old_torch = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    yield
    faiss.omp_set_num_threads(old_faiss)
    torch.set_num_threads(old_torch)


# The three kNN code paths on CPU: faiss, torch matmul + numpy selection, and the device
# selection (torch.topk on packed keys) that CUDA uses, forced onto the CPU.
PATHS = ["faiss", "torch", "torch-topk"]


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "torch-topk":
        monkeypatch.setattr(knn, "_TORCH_SELECT_ON_CPU", True)
        return "torch"
    return str(request.param)


# --------------------------------------------------------------------------- references


def brute_force_ranking(x: np.ndarray) -> list[list[int]]:
    """For every query, all other items by (float64 squared distance, index)."""
    x64 = np.asarray(x, dtype=np.float64)
    dist = ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(axis=-1)
    n = len(x64)
    return [sorted((j for j in range(n) if j != i), key=lambda j, i=i: (dist[i, j], j)) for i in range(n)]


def brute_force_metrics(x: np.ndarray, y: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """R@k, MAP@R and RP written out per query, straight from the definitions."""
    recall: dict[int, list[bool]] = {k: [] for k in ks}
    aps: list[float] = []
    rps: list[float] = []
    for i, order in enumerate(brute_force_ranking(x)):
        rel = [bool(y[j] == y[i]) for j in order]
        r = sum(rel)
        if r == 0:  # lone query: excluded
            continue
        for k in ks:
            recall[k].append(any(rel[:k]))
        hits, total = 0, 0.0
        for rank in range(1, r + 1):
            if rel[rank - 1]:
                hits += 1
                total += hits / rank
        aps.append(total / r)
        rps.append(sum(rel[:r]) / r)
    out = {f"R@{k}": (sum(v) / len(v) if v else 0.0) for k, v in recall.items()}
    out["MAP@R"] = sum(aps) / len(aps) if aps else 0.0
    out["RP"] = sum(rps) / len(rps) if rps else 0.0
    return out


def brute_force_f1(labels: np.ndarray, clusters: np.ndarray) -> float:
    tp = same_cluster = same_label = 0
    for i, j in itertools.combinations(range(len(labels)), 2):
        sc, sl = clusters[i] == clusters[j], labels[i] == labels[j]
        same_cluster += sc
        same_label += sl
        tp += sc and sl
    if same_cluster + same_label == 0:
        return 1.0
    p = tp / same_cluster if same_cluster else 0.0
    r = tp / same_label if same_label else 0.0
    return 2 * p * r / (p + r) if p + r else 0.0


# Test points sit on an integer lattice (|x_i| <= 500, d <= 8). Every number a float32 search
# forms on them (products, squared norms, |q|^2 + |g|^2 - 2 q.g, each partial sum of at most
# 4·d·500^2 = 8e6 < 2^24) is an integer float32 holds exactly, so the float32 distances equal the
# float64 reference's in any summation order (faiss or BLAS, any SIMD kernel, any thread count,
# any query chunk): rankings are decided exactly, ties by index, and the reference comparisons
# below hold bit for bit on any machine. (Gaussian float32 points would leave near-ties that
# float32 rounding decides, differently per kernel.)
LATTICE_MAX = 500


def lattice(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to the integer lattice and clipped to +-LATTICE_MAX, as float32."""
    assert values.shape[-1] <= 8, "the exactness argument above needs d <= 8"
    return np.clip(np.rint(values), -LATTICE_MAX, LATTICE_MAX).astype(np.float32)


def messy_data(seed: int, n: int = 160, d: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Random points with exact duplicates (same and different labels) and singleton classes."""
    rng = np.random.default_rng(seed)
    x = lattice(rng.standard_normal((n, d)) * 100)
    y = rng.integers(0, 30, size=n)
    dup_src = rng.choice(n, 30, replace=False)
    x[dup_src[:15]] = x[dup_src[15:]]  # duplicates, mostly with different labels
    y[dup_src[:5]] = y[dup_src[15:20]]  # a few with the same label
    y[:6] = 1000 + np.arange(6)  # singleton classes
    return x, y


def assert_retrieval_equal(got: dict[str, float], want: dict[str, float], tol: float = 1e-9) -> None:
    # Same rankings (exact distances, see lattice()); the metrics are then float64 means and dot
    # products of <= 3,000 terms in [0, 1] summed in different orders: < 3e3 · 1.1e-16 = 3e-13 apart.
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=tol), key


# --------------------------------------------------------------------------- retrieval metrics


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_random(seed: int, path: str) -> None:
    x, y = messy_data(seed)
    got = evaluate_embeddings(x, y, KS, backend=path, device="cpu", clustering=False)  # type: ignore[arg-type]
    assert_retrieval_equal(got, brute_force_metrics(x, y))
    assert set(got) == set(RETRIEVAL_KEYS)


def test_matches_brute_force_with_massive_ties(path: str) -> None:
    # Small-integer coordinates: float32 distances are exact and most of them tie.
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, size=(200, 3)).astype(np.float32)
    y = rng.integers(0, 25, size=200)
    got = evaluate_embeddings(x, y, KS, backend=path, device="cpu", clustering=False)  # type: ignore[arg-type]
    assert_retrieval_equal(got, brute_force_metrics(x, y))


def test_query_is_excluded_by_index_not_by_first_column(path: str) -> None:
    # Items 0 and 1 coincide. For query 1 the raw kNN (ties -> lower index) is [0, 1, 2, 3]:
    # the query is the *second* column. Dropping the first column would drop its neighbour 0
    # (other label) and keep the query itself, a false hit.
    x = np.array([[0, 0], [0, 0], [5, 0], [5, 1]], dtype=np.float32)
    y = np.array([0, 1, 1, 0])
    index = faiss.IndexFlatL2(2)
    index.add(x)
    _, raw = index.search(x, 4)
    assert raw[1].tolist() == [0, 1, 2, 3]  # the premise of the test

    _, nbr = ExactKnn(device="cpu", backend=path)(x, x, 2, exclude=np.arange(4))  # type: ignore[arg-type]
    assert nbr[1].tolist() == [0, 2]
    assert nbr[0].tolist() == [1, 2]

    got = evaluate_embeddings(x, y, (1, 2), backend=path, device="cpu", clustering=False)  # type: ignore[arg-type]
    want = brute_force_metrics(x, y, (1, 2))
    assert_retrieval_equal(got, want)
    # By hand, every nearest neighbour has the other label (0->1, 1->0, 2->3, 3->2): R@1 = 0.
    assert got["R@1"] == 0.0
    # Dropping the first column instead would make query 1 its own neighbour: R@1 = 1/4.
    naive_first = raw[:, 1]
    assert float(np.mean(y[naive_first] == y)) == 0.25


def large_classes(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Classes of 700, 500 and 300 (R up to 699: the dense path on CPU), 5 singletons and some
    exact duplicates across classes."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.repeat([0, 1, 2], [700, 500, 300]), 10 + np.arange(5)])
    x = lattice((rng.standard_normal((y.size, 6)) + 0.7 * (y % 10)[:, None]) * 60)
    x[:20] = x[700:720]
    return x, y


@pytest.mark.parametrize("data", ["messy", "large_classes"])
def test_matches_pytorch_metric_learning(data: str) -> None:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, y = messy_data(5, n=300, d=8) if data == "messy" else large_classes(5)
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    pml = calc.get_accuracy(xt, yt, xt, yt, ref_includes_query=True)
    for backend in ("auto", "faiss", "torch"):
        got = evaluate_embeddings(x, y, (1,), backend=backend, device="cpu", clustering=False)  # type: ignore[arg-type]
        # Lattice points: every backend and PML's faiss search get the same exact distances and
        # rankings; both sides then average <= 1,505 per-query values in float64 (PML's sums and
        # ours run in different orders): < 2e3 · 1.1e-16 = 2e-13 apart.
        tol = 1e-12
        assert got["R@1"] == pytest.approx(pml["precision_at_1"], abs=tol)
        assert got["MAP@R"] == pytest.approx(pml["mean_average_precision_at_r"], abs=tol)
        assert got["RP"] == pytest.approx(pml["r_precision"], abs=tol)


def test_large_r_path_matches_brute_force() -> None:
    # 3 classes of 1,000: MAP@R needs 999 neighbours per query (the dense path on CPU).
    rng = np.random.default_rng(7)
    n, d = 3000, 8
    y = rng.integers(0, 3, size=n)
    x = lattice((rng.standard_normal((3, d))[y] * 0.8 + rng.standard_normal((n, d))) * 100)
    x[:10] = x[10:20]  # a few duplicates
    xd = x.astype(np.float64)
    sq = (xd**2).sum(1)
    aps, rps, r1 = [], [], []
    for i in range(n):  # per-query reference, vectorised within the query
        dist = sq + sq[i] - 2 * xd @ xd[i]
        dist[i] = np.inf
        order = np.lexsort((np.arange(n), dist))[: n - 1]
        rel = y[order] == y[i]
        r = int(rel.sum())
        top = rel[:r]
        aps.append(float((np.cumsum(top) / np.arange(1, r + 1))[top].sum() / r))
        rps.append(top.mean())
        r1.append(rel[0])
    for backend, chunk in (("auto", 700), ("faiss", None)):  # auto: the dense path (k > FAISS_MAX_K)
        got = evaluate_embeddings(
            x, y, (1,), device="cpu", backend=backend, clustering=False, query_chunk=chunk
        )  # type: ignore[arg-type]
        # same exact rankings (lattice points); float64 sums of <= 3,000 terms in [0, 1]: 3e-13
        assert got["R@1"] == pytest.approx(np.mean(r1), abs=1e-9)
        assert got["MAP@R"] == pytest.approx(np.mean(aps), abs=1e-9)
        assert got["RP"] == pytest.approx(np.mean(rps), abs=1e-9)


def test_blocks_that_straddle_the_faiss_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    # Class sizes from 1 to 40 with the faiss / dense switch lowered to k = 12: queries needing
    # few and many neighbours are searched by different paths in one call.
    monkeypatch.setattr(knn, "FAISS_MAX_K", 12)
    rng = np.random.default_rng(11)
    y = np.repeat(np.arange(12), [1, 1, 2, 3, 5, 8, 10, 13, 17, 20, 30, 40])
    x = lattice((rng.standard_normal((y.size, 5)) + y[:, None] * 0.05) * 100)
    want = brute_force_metrics(x, y)
    for chunk in (None, 9):
        got = evaluate_embeddings(x, y, KS, device="cpu", clustering=False, query_chunk=chunk)
        assert_retrieval_equal(got, want)


def test_chunking_and_repeat_calls_give_identical_numbers() -> None:
    x, y = messy_data(9, n=200)
    base = evaluate_embeddings(x, y, device="cpu")
    assert evaluate_embeddings(x, y, device="cpu") == base
    small = evaluate_embeddings(x, y, device="cpu", query_chunk=7)
    for key in RETRIEVAL_KEYS:  # same exact rankings; float64 means summed per chunk: < 1e-13 apart
        assert small[key] == pytest.approx(base[key], abs=1e-12)


def test_ks_beyond_the_set_size() -> None:
    x, y = messy_data(2, n=40)
    got = evaluate_embeddings(x, y, (1, 39, 100), device="cpu", clustering=False)
    want = brute_force_metrics(x, y, (1, 39, 100))
    assert_retrieval_equal(got, want)
    assert got["R@100"] == 1.0


def test_torch_inputs_and_dtypes() -> None:
    x, y = messy_data(4, n=120)
    want = evaluate_embeddings(x, y, device="cpu")
    assert evaluate_embeddings(torch.from_numpy(x), torch.from_numpy(y), device="cpu") == want
    assert evaluate_embeddings(x.astype(np.float64), y.astype(np.int16), device="cpu") == want
    half = evaluate_embeddings(torch.from_numpy(x).to(torch.bfloat16), torch.from_numpy(y), device="cpu")
    xb = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert_retrieval_equal(half, brute_force_metrics(xb, y))
    assert evaluate_embeddings(x, y.reshape(-1, 1), device="cpu") == want


# --------------------------------------------------------------------------- edge cases


def test_all_singletons() -> None:
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    got = evaluate_embeddings(x, np.arange(10), device="cpu")
    assert all(got[k] == 0.0 for k in RETRIEVAL_KEYS)
    assert got["NMI"] == 1.0 and got["F1"] == 1.0  # 10 clusters of one: the labels exactly


def test_one_class() -> None:
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    got = evaluate_embeddings(x, np.zeros(10, dtype=np.int64), device="cpu")
    assert all(got[k] == 1.0 for k in RETRIEVAL_KEYS)
    assert got["NMI"] == 1.0 and got["F1"] == 1.0


def test_two_items() -> None:
    x = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    assert evaluate_embeddings(x, [3, 3], (1,), device="cpu")["MAP@R"] == 1.0
    assert evaluate_embeddings(x, [3, 4], (1,), device="cpu")["R@1"] == 0.0


@pytest.mark.parametrize(
    ("embeddings", "labels", "ks", "match"),
    [
        (np.zeros((4, 2)), np.zeros(3, dtype=int), KS, "3 entries but there are 4"),
        (np.array([[0.0, np.nan], [1.0, 1.0]]), [0, 0], KS, "NaN or inf"),
        (np.array([[0.0, np.inf], [1.0, 1.0]]), [0, 0], KS, "NaN or inf"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), KS, "empty"),
        (np.zeros((1, 3)), [0], KS, "at least 2 items"),
        (np.zeros(5), np.zeros(5, dtype=int), KS, "2-D"),
        (np.zeros((3, 2)), [0.5, 1.0, 2.0], KS, "integers"),
        (np.zeros((3, 2)), [0, 1, 2], (1, 0), "k in ks"),
        (np.zeros((3, 2)), [0, 1, 2], (), "at least one k"),
        (np.array([["a", "b"], ["c", "d"]]), [0, 1], KS, "real numbers"),
    ],
)
def test_bad_input_raises(embeddings: object, labels: object, ks: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        evaluate_embeddings(embeddings, labels, ks, device="cpu")  # type: ignore[arg-type]


def test_bad_options_raise() -> None:
    x, y = np.zeros((4, 2)), [0, 0, 1, 1]
    with pytest.raises(ValueError, match="backend must be"):
        evaluate_embeddings(x, y, backend="annoy", device="cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="query_chunk"):
        evaluate_embeddings(x, y, query_chunk=0, device="cpu")
    with pytest.raises(ValueError, match="num_threads"):
        evaluate_embeddings(x, y, num_threads=-1, device="cpu")


def test_knn_bad_input_and_caps() -> None:
    x = np.zeros((5, 3), dtype=np.float32)
    search = ExactKnn(device="cpu")
    with pytest.raises(ValueError, match="dimension"):
        search(x, np.zeros((5, 4)), 1)
    with pytest.raises(ValueError, match="k must be"):
        search(x, x, 0)
    with pytest.raises(ValueError, match="gallery indices or -1"):
        search(x, x, 1, exclude=np.full(5, 7))
    with pytest.raises(ValueError, match="backend must be"):
        ExactKnn(backend="annoy")  # type: ignore[arg-type]
    # k is capped at the items searchable: the gallery, less the query when it is left out
    assert search(x, x, 6)[1].shape == (5, 5)
    assert search(x, x, 5, exclude=np.arange(5))[1].shape == (5, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        evaluate_embeddings(np.zeros((3, 2)), [0, 0, 1], device="cuda")


# --------------------------------------------------------------------------- kNN


def test_knn_matches_brute_force(path: str) -> None:
    rng = np.random.default_rng(1)
    q = lattice(rng.standard_normal((37, 5)) * 100)
    g = lattice(rng.standard_normal((50, 5)) * 100)
    g[10] = g[3]  # a tie
    search = ExactKnn(device="cpu", backend=path)  # type: ignore[arg-type]
    dist, idx = search(q, g, 6, chunk=8)
    d64 = np.sqrt(((q[:, None, :].astype(np.float64) - g[None, :, :]) ** 2).sum(-1))
    want = np.lexsort((np.broadcast_to(np.arange(50), d64.shape), d64), axis=1)[:, :6]
    assert idx.dtype == np.int64 and dist.dtype == np.float32
    assert np.array_equal(idx, want)
    # the squared distances are exact integers (lattice points); float32 sqrt rounds correctly,
    # so each distance is within one half-ulp (relative 2^-24 = 6e-8) of the float64 one
    np.testing.assert_allclose(dist, np.take_along_axis(d64, want, axis=1), rtol=2**-23, atol=0)

    # the set against itself, each query left out by index
    _, self_idx = search(g, g, 5, exclude=np.arange(50))
    ranking = brute_force_ranking(g)
    assert self_idx.tolist() == [row[:5] for row in ranking]


# --------------------------------------------------------------------------- clustering


def test_pair_f1_hand_computed() -> None:
    labels = [0, 0, 0, 1, 1]
    clusters = [0, 0, 1, 1, 1]
    # same-label pairs: C(3,2) + C(2,2) = 4; same-cluster pairs: C(2,2) + C(3,2) = 4;
    # both: {0,1} and {3,4} = 2. P = R = 2/4, F1 = 0.5.
    assert pair_f1(labels, clusters) == 0.5
    assert pair_f1(labels, [5, 5, 5, 2, 2]) == 1.0  # same partition, other ids
    # one cluster: P = 4/10, R = 1, F1 = 2 * 0.4 / 1.4 (pair counts are exact integers; the
    # two float64 quotients differ by a few ulps, well inside approx's default rel=1e-6)
    assert pair_f1(labels, [0] * 5) == pytest.approx(2 * 0.4 / 1.4)
    assert pair_f1([0, 1, 2], [0, 1, 2]) == 1.0  # no pairs on either side
    assert pair_f1([0, 1, 2], [0, 0, 1]) == 0.0


def test_pair_f1_matches_pair_loop() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels = rng.integers(0, 6, size=60)
        clusters = rng.integers(0, 8, size=60)
        # exact integer pair counts on both sides, then a few float64 divisions: ~1e-16 apart
        assert pair_f1(labels, clusters) == pytest.approx(brute_force_f1(labels, clusters), abs=1e-12)


def test_nmi_hand_computed() -> None:
    # float64 entropies of <= 4 terms (sklearn): ~1e-16 off, inside approx's rel=1e-6 / abs=1e-12
    assert nmi([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    # clusters determine the labels: I = H(L) = ln 2; NMI = I / mean(H(L), H(C))
    labels, clusters = [0, 0, 1, 1], [0, 0, 1, 2]
    h_l, h_c = math.log(2), -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert nmi(labels, clusters) == pytest.approx(math.log(2) / ((h_l + h_c) / 2))


def test_clustering_metrics_on_separated_blobs() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 20)
    centres = rng.standard_normal((5, 8)) * 20
    x = (centres[y] + rng.standard_normal((100, 8)) * 0.1).astype(np.float32)
    got = evaluate_embeddings(x, y, device="cpu", seed=3)
    # blobs 20σ apart: k-means finds them whatever the rounding; NMI of equal partitions is 1
    # up to float64 rounding of the entropies (~1e-16), F1 exactly 1 (integer pair counts)
    assert got["NMI"] == pytest.approx(1.0) and got["F1"] == 1.0
    assert all(got[k] == 1.0 for k in RETRIEVAL_KEYS)


def test_kmeans_labels_deterministic_and_edge_cases() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 4)).astype(np.float32)
    a = kmeans_labels(x, 7, seed=1)
    assert np.array_equal(a, kmeans_labels(x, 7, seed=1))
    assert a.dtype == np.int64 and set(a.tolist()) <= set(range(7))
    assert np.array_equal(kmeans_labels(x[:5], 5), np.arange(5))
    assert np.array_equal(kmeans_labels(x[:5], 1), np.zeros(5))
    # duplicates everywhere: empty clusters must be refilled or tolerated, not crash
    same = np.repeat(x[:2], 50, axis=0)
    labels = kmeans_labels(same, 4, seed=0)
    assert labels.shape == (100,)
    # subsampled training (n > max_points_per_centroid * k) still labels every row
    sub = kmeans_labels(x, 3, seed=0, max_points_per_centroid=20)
    assert sub.shape == (300,) and set(sub.tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans_labels(x, 0)
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans_labels(x, 301)


def test_exact_selection_with_ties_and_skipped_entries() -> None:
    # The partial sort behind the dense path: k smallest per row by (value, column), NaN skipped,
    # including rows where many entries tie with the k-th value; -0.0 counts as 0.0.
    rng = np.random.default_rng(5)
    d = rng.integers(0, 4, size=(40, 30)).astype(np.float32)
    d[rng.random(d.shape) < 0.1] = np.nan
    d[d == 0] = -0.0
    for k in (1, 3, 10, 20):
        dist, cols = knn._select_rows_numpy(d.copy(), k)
        for i in range(d.shape[0]):
            valid = [j for j in range(d.shape[1]) if not np.isnan(d[i, j])]
            want = sorted(valid, key=lambda j, i=i: (d[i, j], j))[:k]
            assert cols[i].tolist() == want
            assert dist[i].tolist() == [abs(float(d[i, j])) for j in want]
            assert not np.signbit(dist[i]).any()


def plain_lloyd(x: np.ndarray, n_clusters: int, seed: int, niter: int) -> np.ndarray:
    """Textbook Lloyd with kmeans_labels' seeding: full float64 distances every iteration."""
    rng = np.random.default_rng(seed)
    centroids = x[np.sort(rng.choice(len(x), n_clusters, replace=False))].astype(np.float64)
    x64 = x.astype(np.float64)

    def assign_all(c: np.ndarray) -> np.ndarray:
        d2 = ((x64[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        # kmeans_labels decides in float32: centroids rounded to float32 (relative 2^-24 each)
        # and |x|^2 + |c|^2 - 2 x.c summed from d + 2 terms, so each squared distance may be off
        # by (d + 4)·u·(|x| + |c|)^2. The comparison is only meaningful if no point's two
        # nearest centroids are closer than twice that: the data must leave no such near-tie.
        two = np.sort(d2, axis=1)[:, :2]
        scale = (np.linalg.norm(x64, axis=1) + np.linalg.norm(c, axis=1).max()) ** 2
        bound = 2 * (x64.shape[1] + 4) * 2.0**-24 * scale
        assert (two[:, 1] - two[:, 0] > bound).all(), "test data must not leave a near-tie to float32"
        return np.argmin(d2, axis=1)

    assign = assign_all(centroids)
    for _ in range(niter):
        assert np.bincount(assign, minlength=n_clusters).all(), "test data must not empty a cluster"
        centroids = np.stack([x64[assign == c].mean(axis=0) for c in range(n_clusters)])
        new = assign_all(centroids)
        if np.array_equal(new, assign):
            break
        assign = new
    return assign


@pytest.mark.parametrize("niter", [1, 3, 50])
def test_kmeans_matches_plain_lloyd(niter: int) -> None:
    # Overlapping blobs so that Lloyd runs several iterations, with late ones moving only a few
    # centroids (the incremental re-assignment path) and early ones moving many (full search).
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((15, 4)) * 3
    x = (centres[rng.integers(0, 15, size=600)] + rng.standard_normal((600, 4))).astype(np.float32)
    got = kmeans_labels(x, 15, seed=4, niter=niter)
    assert np.array_equal(got, plain_lloyd(x, 15, seed=4, niter=niter))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_clusters_like_kmeans_labels(seed: int, path: str) -> None:
    # evaluate_embeddings reads k-means' first assignment off its kNN lists; the clustering must
    # be the one kmeans_labels computes (duplicates, singletons and lone queries included).
    x, y = messy_data(seed, n=400, d=5)
    x[50:60] = x[60:70]  # more exact duplicates, some of them seeds
    # and a set where every row has an exact twin, with ~half the rows as seeds, so that twin
    # seeds occur (the later one's nearest seed is the earlier one, not itself)
    rng = np.random.default_rng(seed)
    twins = np.repeat(rng.standard_normal((100, 3)).astype(np.float32), 2, axis=0)
    twin_labels = rng.integers(0, 100, size=200)
    for data, labels in ((x, y), (twins, twin_labels)):
        got = evaluate_embeddings(data, labels, KS, backend=path, device="cpu", seed=seed)  # type: ignore[arg-type]
        clusters = kmeans_labels(data, len(np.unique(labels)), seed)
        assert got["NMI"] == nmi(labels, clusters)
        assert got["F1"] == pair_f1(labels, clusters)
