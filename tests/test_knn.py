"""The one exact kNN object (das_core.retrieval.knn) and the one array check (das_core.arrays).

Points lie on an integer lattice, so every squared distance is an exact small integer in float32
on any machine, any kernel and any thread count: the neighbour order (ties by lower index) and
the distances can be compared exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from das_core.arrays import as_exclude, as_labels, as_matrix
from das_core.retrieval.knn import EXPLORER_KNN, L2_KNN, ExactKnn


def brute_force(q: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every gallery item of every query, by (squared distance, index), in float64."""
    d2 = ((q[:, None, :].astype(np.float64) - g[None, :, :]) ** 2).sum(-1)
    order = np.lexsort((np.broadcast_to(np.arange(g.shape[0]), d2.shape), d2), axis=1)
    return np.sqrt(np.take_along_axis(d2, order, axis=1)), order


@pytest.mark.parametrize(
    "knn", [L2_KNN, EXPLORER_KNN, ExactKnn(device="cpu", backend="torch")], ids=["faiss", "exact", "dense"]
)
def test_exact_on_a_lattice(knn: ExactKnn) -> None:
    rng = np.random.default_rng(3)
    g = rng.integers(-3, 4, size=(40, 3)).astype(np.float32)  # many ties and duplicates
    q = rng.integers(-3, 4, size=(9, 3)).astype(np.float32)
    want_d, want_i = brute_force(q, g)
    dist, idx = knn(q, g, 7)
    assert dist.dtype == np.float32 and idx.dtype == np.int64
    assert idx.tolist() == want_i[:, :7].tolist()
    # sqrt of an exact integer: float32 sqrt is correctly rounded, so equal to float64's rounding
    assert dist.tolist() == want_d[:, :7].astype(np.float32).tolist()
    # leave-one-out by index: a duplicate of the query still comes first, the query never
    _, loo = knn(g, g, 5, exclude=np.arange(40))
    full = brute_force(g, g)[1]
    assert loo.tolist() == [[j for j in row if j != i][:5] for i, row in enumerate(full.tolist())]
    # k capped at what is searchable; no queries or an empty gallery give empty results
    assert knn(q, g[:3], 10)[1].shape == (9, 3)
    assert knn(q, g[:3], 10, exclude=0)[1].shape == (9, 2)
    assert knn(q[:0], g, 4)[1].shape == (0, 4)
    assert knn(q, g[:0], 4)[1].shape == (9, 0)
    # one gallery searched many times gives the same as one call
    gal = knn.index(g)
    assert gal.search(q, 7)[1].tolist() == idx.tolist() and len(gal) == 40 and gal.dim == 3


def test_array_checks_name_the_argument_and_the_problem() -> None:
    ok = as_matrix(torch.arange(6).reshape(3, 2), "x")
    assert ok.dtype == np.float32 and ok.flags.c_contiguous and ok.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert as_matrix(np.ones(4), "q", allow_vector=True).shape == (1, 4)
    for bad, kwargs, match in [
        (np.zeros(3), {}, "x must be a 2-D array"),
        (np.zeros((0, 3)), {"allow_empty": False}, "x is empty"),
        (np.zeros((2, 3)), {"dim": 4}, "x have dimension 3 but 4 is expected"),
        (np.array([[1.0, np.nan]]), {}, "x contain NaN or inf"),
        (np.array([["a"]]), {}, "x must be real numbers"),
    ]:
        with pytest.raises(ValueError, match=match):
            as_matrix(bad, "x", **kwargs)
    assert as_labels(np.array([[1], [2]]), 2).tolist() == [1, 2]
    with pytest.raises(ValueError, match="y has 2 entries but there are 3 items"):
        as_labels([1, 2], 3, "y")
    with pytest.raises(ValueError, match="y must be integers"):
        as_labels([0.5], None, "y")
    assert as_exclude(2, 3, 5).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="gallery indices or -1"):
        as_exclude([0, 9], 2, 5)
