"""PDDM (Huang et al. 2016): the unit, hard quadruplet mining by score, the losses, the
miner variant, and their integration into the lead's ``build_criterion``."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from das_core.training.config import TrainConfig
from das_core.training.losses import build_criterion
from das_core.training.pddm import (
    PDDMLoss,
    PDDMMiner,
    PDDMUnit,
    embedding_loss,
    metric_loss,
    mine_quadruplets,
)


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    torch.manual_seed(0)
    yield


def _batch(labels: list[int], dim: int = 8, *, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    x = F.normalize(torch.randn(len(labels), dim), dim=1)
    return x.requires_grad_(grad), torch.tensor(labels)


def _use_table(monkeypatch: pytest.MonkeyPatch, unit: PDDMUnit, table: list[list[float]]) -> None:
    """Make the unit's pair scores a lookup table ``S[a, b]`` (symmetrised from the upper triangle)."""
    t = torch.tensor(table)
    t = torch.triu(t, 1) + torch.triu(t, 1).T

    def lookup(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return t[rows, cols]

    monkeypatch.setattr(unit, "pair_scores", lookup)


def _reference_mining(
    scores: torch.Tensor, labels: list[int], q: int
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Brute force, pair by pair: the definition, for checking the vectorised miner."""
    n = len(labels)
    if len(set(labels)) < 2:
        return [], [], [], []
    pos = [(scores[i, j].item(), i, j) for i in range(n) for j in range(i + 1, n) if labels[i] == labels[j]]
    pos.sort(key=lambda t: t[0])  # stable: ties keep row-major order
    out: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])
    for _, i, j in pos[:q]:
        negs_i = [b for b in range(n) if labels[b] != labels[i]]
        negs_j = [b for b in range(n) if labels[b] != labels[j]]
        k = max(negs_i, key=lambda b: (scores[i, b].item(), -b))
        m = max(negs_j, key=lambda b: (scores[j, b].item(), -b))
        for lst, val in zip(out, (i, j, k, m), strict=True):
            lst.append(val)
    return out


# -- the unit ---------------------------------------------------------------------------------


def test_unit_shapes_and_broadcasting() -> None:
    unit = PDDMUnit(16)
    assert unit.hidden == 16
    a, b = torch.randn(5, 16), torch.randn(5, 16)
    assert unit(a, b).shape == (5,)
    assert unit(torch.randn(2, 3, 16), torch.randn(2, 3, 16)).shape == (2, 3)
    assert unit(torch.randn(4, 1, 16), torch.randn(1, 3, 16)).shape == (4, 3)
    assert PDDMUnit(16, hidden=5)(a, b).shape == (5,)
    with pytest.raises(ValueError, match="dim 16"):
        unit(torch.randn(5, 15), torch.randn(5, 15))


def test_unit_is_symmetric() -> None:
    unit = PDDMUnit(12, hidden=7)
    a, b = F.normalize(torch.randn(30, 12), dim=1), F.normalize(torch.randn(30, 12), dim=1)
    # |a - b| and a + b are bitwise symmetric, so is everything after: equal, not just close
    torch.testing.assert_close(unit(a, b), unit(b, a), atol=0, rtol=0)


def test_unit_finite_for_identical_inputs_values_and_gradients() -> None:
    unit = PDDMUnit(8)
    f = F.normalize(torch.randn(4, 8), dim=1).requires_grad_(True)
    s = unit(f, f)
    assert torch.isfinite(s).all()
    s.sum().backward()
    assert f.grad is not None and torch.isfinite(f.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in unit.parameters())
    # A unit whose ReLUs are all off (u1 = v1 = 0) is finite too: the score is b_s.
    dead = PDDMUnit(3)
    with torch.no_grad():
        for layer in (dead.w_u, dead.w_v):
            layer.weight.zero_()
            layer.bias.fill_(-1.0)
    assert torch.isfinite(dead(f[:, :3], f[:, :3] * 0.5)).all()


def _hand_unit() -> PDDMUnit:
    """d = h = 2; W_u = W_v = I, b_u = b_v = 0; W_c = [I, −I], b_c = 0 (c = ReLU(u1n − v1n));
    W_s = (1, 2), b_s = 0.5."""
    unit = PDDMUnit(2)
    with torch.no_grad():
        unit.w_u.weight.copy_(torch.eye(2))
        unit.w_u.bias.zero_()
        unit.w_v.weight.copy_(torch.eye(2))
        unit.w_v.bias.zero_()
        unit.w_c.weight.copy_(torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, -1.0]]))
        unit.w_c.bias.zero_()
        unit.w_s.weight.copy_(torch.tensor([[1.0, 2.0]]))
        unit.w_s.bias.fill_(0.5)
    return unit


def test_unit_score_by_hand() -> None:
    # In float64: ~20 roundings of numbers <= 2 (the score's own arithmetic, 0.6 and 0.8 not
    # being exact) stay below 20 · 2 · 1.1e-16 = 5e-15, so 1e-12 leaves no room for a wrong formula.
    unit = _hand_unit().double()
    # f_i = (1, 0), f_j = (0.6, 0.8): u = (0.4, 0.8) -> (1, 2)/√5; v = (0.8, 0.4) -> (2, 1)/√5;
    # c = ReLU((1, 2)/√5 − (2, 1)/√5) = (0, 1/√5); S = 1·0 + 2/√5 + 0.5.
    fi = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    fj = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    assert unit(fi, fj).item() == pytest.approx(0.5 + 2 / math.sqrt(5), abs=1e-12)
    # Identical pair: u = 0 -> u1 = 0; v = (1, 0) -> v1n = (1, 0); c = ReLU(−(1, 0)) = 0; S = b_s
    # exactly (every product is by 0 or 1).
    assert unit(fi, fi).item() == 0.5
    assert _hand_unit()(fi.float(), fi.float()).item() == 0.5  # and in float32 too
    # The unit looks at directions only: scaling the pair changes nothing.
    assert unit(3 * fi, 3 * fj).item() == pytest.approx(0.5 + 2 / math.sqrt(5), abs=1e-12)


# pair_scores, score_matrix and chunked calls run the unit's layers on batches of different
# shapes, which BLAS may sum in different orders. In float64 that rounding is ~1e-15 relative
# (amplified at most 1e4 times by normalising a short u1 or v1): 1e-10 is an argued bound. In
# float32 it would be ~1e-6 and up, a guess about this machine's kernels.
F64 = {"atol": 1e-10, "rtol": 0.0}


def test_pair_scores_and_score_matrix_agree_with_forward() -> None:
    unit = PDDMUnit(6).double()
    x = F.normalize(torch.randn(7, 6, dtype=torch.float64), dim=1)
    full = unit.score_matrix(x)
    assert full.shape == (7, 7)
    rows, cols = torch.tensor([0, 3, 6, 2]), torch.tensor([1, 3, 0, 5])
    torch.testing.assert_close(unit.pair_scores(x, rows, cols), full[rows, cols], **F64)
    torch.testing.assert_close(
        unit.pair_scores(x, rows.view(2, 2), cols.view(2, 2)), full[rows, cols].view(2, 2), **F64
    )
    assert unit.score_matrix(x, x[:3]).shape == (7, 3)


def test_pair_scores_chunks_large_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    import das_core.training.pddm as pddm

    unit = PDDMUnit(4).double()
    x = F.normalize(torch.randn(9, 4, dtype=torch.float64), dim=1)
    rows = torch.arange(9).repeat_interleave(9)
    cols = torch.arange(9).repeat(9)
    whole = unit.pair_scores(x, rows, cols)
    monkeypatch.setattr(pddm, "_CHUNK_ELEMENTS", 8 * 10)  # 10 pairs per chunk
    torch.testing.assert_close(unit.pair_scores(x, rows, cols), whole, **F64)
    torch.testing.assert_close(unit.score_matrix(x).reshape(-1), whole, **F64)


# -- hard quadruplet mining -------------------------------------------------------------------

# Six points on the unit circle; classes 0 = {0, 1, 2}, 1 = {3, 4}, 2 = {5}.
_ANGLES = [0.0, 0.3, 2.5, 1.0, 1.4, 3.0]
_LABELS = [0, 0, 0, 1, 1, 2]
# Scores, upper triangle: the lowest-scoring positive pair is (0, 1) although the Euclidean
# farthest one is (0, 2) (angles 0 and 2.5); the highest-scoring negatives are 5 for 0
# (Euclidean nearest: 3) and 4 for 1 (Euclidean nearest: 3).
_TABLE = [
    # 0    1     2     3     4     5
    [0.0, -0.9, 0.8, -0.5, 0.1, 0.7],  # 0
    [0.0, 0.0, 0.2, 0.3, 0.6, -0.4],  # 1
    [0.0, 0.0, 0.0, 0.0, 0.1, 0.9],  # 2
    [0.0, 0.0, 0.0, 0.0, -0.7, 0.2],  # 3
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.5],  # 4
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # 5
]


def _circle() -> torch.Tensor:
    a = torch.tensor(_ANGLES)
    return torch.stack([a.cos(), a.sin()], dim=1)


def _as_lists(quads: tuple[torch.Tensor, ...]) -> list[list[int]]:
    return [t.tolist() for t in quads]


def test_mining_picks_hardest_by_score_not_by_distance(monkeypatch: pytest.MonkeyPatch) -> None:
    unit = PDDMUnit(2)
    _use_table(monkeypatch, unit, _TABLE)
    x, labels = _circle(), torch.tensor(_LABELS)
    quads = mine_quadruplets(unit, x, labels)
    assert all(t.dtype == torch.long for t in quads)
    assert _as_lists(quads) == [[0], [1], [5], [4]]
    # The case is meaningful: a Euclidean miner would pick something else.
    d = torch.cdist(x, x)
    assert d[0, 2] > d[0, 1] and d[0, 2] > d[1, 2]
    assert d[0, 3] < d[0, 5] and d[1, 3] < d[1, 4]


def test_mining_several_quadruplets(monkeypatch: pytest.MonkeyPatch) -> None:
    unit = PDDMUnit(2)
    _use_table(monkeypatch, unit, _TABLE)
    x, labels = _circle(), torch.tensor(_LABELS)
    # Positive pairs by score: (0, 1) −0.9 < (3, 4) −0.7 < (1, 2) 0.2 < (0, 2) 0.8.
    quads = mine_quadruplets(unit, x, labels, num_quadruplets=3)
    # (0,1): k̂ = argmax over {3,4,5} of S[0] = 5, l̂ = argmax of S[1] = 4.
    # (3,4): negatives {0,1,2,5}: S[3] = (−0.5, 0.3, 0.0, 0.2) -> 1; S[4] = (0.1, 0.6, 0.1, 0.5) -> 1.
    # (1,2): negatives {3,4,5}: S[1] = (0.3, 0.6, −0.4) -> 4; S[2] = (0.0, 0.1, 0.9) -> 5.
    assert _as_lists(quads) == [[0, 3, 1], [1, 4, 2], [5, 1, 4], [4, 1, 5]]
    # q larger than the number of positive pairs: all four, ascending; (0, 2) gets 5 and 5.
    quads = mine_quadruplets(unit, x, labels, num_quadruplets=50)
    assert _as_lists(quads) == [[0, 3, 1, 0], [1, 4, 2, 2], [5, 1, 4, 5], [4, 1, 5, 5]]


# The miner scores pairs in batches of other shapes than score_matrix does: in float32 a
# near-tie between two candidates could be decided differently by another BLAS. In float64 the
# two differ by ~1e-15 and random scores never come that close.
def test_mining_matches_brute_force_with_a_real_unit() -> None:
    unit = PDDMUnit(8, hidden=6).double()
    labels = [0, 1, 0, 2, 1, 0, 2, 3, 1, 3]
    x, lab = _batch(labels)
    x = x.double()
    scores = unit.score_matrix(x).detach()
    for q in (1, 2, 5):
        got = _as_lists(mine_quadruplets(unit, x, lab, q))
        assert got == [list(t) for t in _reference_mining(scores, labels, q)]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    labels=st.lists(st.integers(0, 3), min_size=0, max_size=12),
    q=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_mining_matches_brute_force_property(labels: list[int], q: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    unit = PDDMUnit(4).double()  # float64: see test_mining_matches_brute_force_with_a_real_unit
    x = F.normalize(torch.randn(len(labels), 4, generator=g, dtype=torch.float64), dim=1)
    got = _as_lists(mine_quadruplets(unit, x, torch.tensor(labels, dtype=torch.long), q))
    scores = unit.score_matrix(x).detach()
    assert got == [list(t) for t in _reference_mining(scores, labels, q)]


def test_mining_cost_is_positive_pairs_plus_ends_times_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    unit = PDDMUnit(8)
    labels = [c for c in range(4) for _ in range(3)]  # N = 12, P = 4 · 3 = 12
    x, lab = _batch(labels)
    evaluated: list[int] = []
    forward = unit.forward

    def counting(fi: torch.Tensor, fj: torch.Tensor) -> torch.Tensor:
        evaluated.append(torch.broadcast_shapes(fi.shape, fj.shape)[:-1].numel())
        return forward(fi, fj)

    monkeypatch.setattr(unit, "forward", counting)
    mine_quadruplets(unit, x, lab, num_quadruplets=2)
    assert sum(evaluated) == 12 + 2 * 2 * 12 < 12 * 12


def test_mining_runs_without_gradients() -> None:
    unit = PDDMUnit(8)
    x, lab = _batch([0, 0, 1, 1], grad=True)
    quads = mine_quadruplets(unit, x, lab)
    assert not any(t.requires_grad for t in quads)
    assert all(p.grad is None for p in unit.parameters())


@pytest.mark.parametrize("labels", [[3, 3, 3, 3], [0, 1, 2, 3], [5], []])
def test_mining_without_quadruplet_is_empty(labels: list[int]) -> None:
    unit = PDDMUnit(8)
    x, lab = _batch(labels)
    quads = mine_quadruplets(unit, x, lab, num_quadruplets=3)
    assert all(t.shape == (0,) and t.dtype == torch.long for t in quads)


def test_mining_refuses_bad_shapes() -> None:
    unit = PDDMUnit(8)
    with pytest.raises(ValueError, match="labels"):
        mine_quadruplets(unit, torch.randn(4, 8), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="num_quadruplets"):
        mine_quadruplets(unit, torch.randn(4, 8), torch.tensor([0, 0, 1, 1]), 0)


# -- the PDDM loss ----------------------------------------------------------------------------


def test_loss_value_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    # e0 = (1, 0), e1 = (0, 1) [class 0]; e2 = (−1, 0), e3 = (0.6, −0.8) [class 1].
    # float64 points: the distances (0.6, 0.8 inexact) are then ~1e-16 off; the table's scores
    # are float32, 0.2 and 0.4 off by <= 2e-8 each, so the loss is within 1e-7 of 2.3
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, -0.8]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    table = [
        [0.0, 0.2, 0.1, 0.4],
        [0.0, 0.0, -0.4, -0.5],
        [0.0, 0.0, 0.0, 0.9],
        [0.0, 0.0, 0.0, 0.0],
    ]
    loss = PDDMLoss(2, alpha=0.5, beta=1.0, lam=0.5)
    _use_table(monkeypatch, loss.unit, table)
    # Positives: S01 = 0.2 < S23 = 0.9 -> (î, ĵ) = (0, 1); k̂ = argmax(S02 = 0.1, S03 = 0.4) = 3;
    # l̂ = argmax(S12 = −0.4, S13 = −0.5) = 2.
    assert _as_lists(mine_quadruplets(loss.unit, x, labels)) == [[0], [1], [3], [2]]
    # E_m = [0.5 + 0.4 − 0.2]₊ + [0.5 − 0.4 − 0.2]₊ = 0.7 + 0 = 0.7.
    # D01 = 2, D03 = 0.16 + 0.64 = 0.8, D12 = 1 + 1 = 2:
    # E_e = [1 + 2 − 0.8]₊ + [1 + 2 − 2]₊ = 2.2 + 1 = 3.2.  E_m + λ·E_e = 0.7 + 1.6 = 2.3.
    assert loss(x, labels).item() == pytest.approx(2.3, abs=1e-6)
    # indices_tuple is ignored.
    assert loss(x, labels, (torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))).item() == pytest.approx(
        2.3
    )


@pytest.mark.parametrize("q", [1, 3])
def test_loss_equals_formula_and_reaches_unit_and_embeddings(q: int) -> None:
    torch.manual_seed(1)
    # Unit and embeddings in float64, the reference below in float64 too: the loss then differs
    # from it only by its own float32 steps (it casts scores and embeddings to float32): each
    # score rounded once (2^-24·|S|, |S| < 5), each squared distance of unit vectors off by
    # <= (d + 2)·2^-24·4 = 2.4e-6 (λ = 0.5 times 4 of them), hinges and mean a few roundings of
    # numbers < 10: < 6e-6 per quadruplet, so the mean is within 1e-5. (Scoring in float32 would
    # add BLAS-order differences between the loss's and score_matrix's batch shapes.)
    loss = PDDMLoss(8, alpha=0.5, beta=1.0, lam=0.5, num_quadruplets=q).double()
    raw = torch.randn(10, 8, requires_grad=True, dtype=torch.float64)
    x = F.normalize(raw, dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 1])
    value = loss(x, labels)
    i, j, k, m = (t.tolist() for t in mine_quadruplets(loss.unit, x, labels, q))
    assert len(i) == q
    expected = 0.0
    with torch.no_grad():
        s = loss.unit.score_matrix(x)
        d = torch.cdist(x, x) ** 2
        for a, b, c, e in zip(i, j, k, m, strict=True):
            e_m = max(0.0, 0.5 + s[a, c] - s[a, b]) + max(0.0, 0.5 + s[b, e] - s[a, b])
            e_e = max(0.0, 1.0 + d[a, b] - d[a, c]) + max(0.0, 1.0 + d[a, b] - d[b, e])
            expected += (e_m + 0.5 * e_e) / q
    assert value.item() == pytest.approx(float(expected), abs=1e-5)
    value.backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0
    for name, p in loss.unit.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert loss.unit.w_s.weight.grad is not None and loss.unit.w_s.weight.grad.abs().sum() > 0


def test_loss_parts_per_quadruplet() -> None:
    unit = PDDMUnit(4)
    x, _ = _batch([0, 0, 1, 1], dim=4)
    quads = (torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([2, 0]), torch.tensor([3, 1]))
    assert metric_loss(unit, x, quads, 0.5).shape == (2,)
    e_e = embedding_loss(x, quads, 1.0)
    d = torch.cdist(x, x) ** 2
    # float32 squared distances of unit vectors, computed two ways: each off by <= (d + 2)·2^-24·4
    # = 1.4e-6, three of them in the sum: < 5e-6, inside assert_close's float32 atol of 1e-5
    torch.testing.assert_close(e_e[0], F.relu(1 + d[0, 1] - d[0, 2]) + F.relu(1 + d[0, 1] - d[1, 3]))


@pytest.mark.parametrize("labels", [[4, 4, 4, 4], [0, 1, 2, 3]])
def test_loss_without_quadruplet_is_zero_and_keeps_the_graph(labels: list[int]) -> None:
    loss = PDDMLoss(8)
    x, lab = _batch(labels, grad=True)
    value = loss(x, lab)
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert x.grad is not None and (x.grad == 0).all()


def test_loss_refuses_bad_options() -> None:
    with pytest.raises(ValueError, match="alpha"):
        PDDMLoss(8, alpha=-1.0)
    with pytest.raises(ValueError, match="num_quadruplets"):
        PDDMLoss(8, num_quadruplets=0)
    with pytest.raises(ValueError, match="dim"):
        PDDMUnit(0)


def test_loss_under_bfloat16_autocast_is_finite() -> None:
    loss = PDDMLoss(8)
    raw = torch.randn(8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = F.normalize(raw, dim=1)
        x = torch.cat([x, x[:2]])  # identical pairs: u = 0
        value = loss(x, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 0]))
    assert torch.isfinite(value)
    value.backward()
    assert raw.grad is not None and torch.isfinite(raw.grad).all()


# -- the miner variant ------------------------------------------------------------------------


def test_miner_two_triplets_per_quadruplet(monkeypatch: pytest.MonkeyPatch) -> None:
    miner = PDDMMiner(2, num_quadruplets=2)
    _use_table(monkeypatch, miner.unit, _TABLE)
    x, labels = _circle(), torch.tensor(_LABELS)
    # Quadruplets (0, 1, 5, 4) and (3, 4, 1, 1) -> triplets (0,1,5), (1,0,4), (3,4,1), (4,3,1).
    anchors, positives, negatives = miner(x, labels)
    assert anchors.tolist() == [0, 1, 3, 4]
    assert positives.tolist() == [1, 0, 4, 3]
    assert negatives.tolist() == [5, 4, 1, 1]
    assert all(t.dtype == torch.long for t in (anchors, positives, negatives))
    (a2, p2, n2), _ = miner.mine_with_loss(x, labels)
    assert (a2.tolist(), p2.tolist(), n2.tolist()) == ([0, 1, 3, 4], [1, 0, 4, 3], [5, 4, 1, 1])


def test_miner_loss_trains_the_unit_not_the_embeddings() -> None:
    miner = PDDMMiner(8, alpha=0.5, num_quadruplets=2)
    raw = torch.randn(8, 8, requires_grad=True)
    x = F.normalize(raw, dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    triplets, e_m = miner.mine_with_loss(x, labels)
    quads = mine_quadruplets(miner.unit, x, labels, 2)
    # the miner's loss is this very call on the same quadruplets: equal up to the mean's rounding
    torch.testing.assert_close(e_m, metric_loss(miner.unit, x.detach(), quads, 0.5).mean())
    assert e_m.requires_grad and e_m.item() > 0
    e_m.backward()
    assert raw.grad is None
    assert miner.unit.w_s.weight.grad is not None and miner.unit.w_s.weight.grad.abs().sum() > 0
    # The triplets feed an ordinary pytorch-metric-learning loss.
    from pytorch_metric_learning.losses import TripletMarginLoss

    assert torch.isfinite(TripletMarginLoss(margin=0.2)(x, labels, triplets))


def test_miner_without_quadruplet() -> None:
    miner = PDDMMiner(8)
    x, lab = _batch([1, 1, 1], grad=True)
    (a, p, n), e_m = miner.mine_with_loss(x, lab)
    assert a.numel() == p.numel() == n.numel() == 0
    assert e_m.item() == 0.0
    assert all(t.numel() == 0 for t in miner(x, lab))


# -- integration with the lead's criterion ----------------------------------------------------


def _needs_das(das: bool) -> None:
    if das:
        pytest.importorskip("das_core.training.das", reason="DAS (das_core/training/das.py) is not importable yet")


@pytest.mark.parametrize("das", [False, True])
@pytest.mark.parametrize(
    ("loss_name", "miner_name", "prefix"), [("pddm", "none", "loss."), ("triplet", "pddm", "miner.")]
)
def test_build_criterion_trains_a_step(das: bool, loss_name: str, miner_name: str, prefix: str) -> None:
    _needs_das(das)
    values = {
        "loss": loss_name,
        "miner": miner_name,
        "embedding_dim": 16,
        "batch_size": 8,
        "samples_per_class": 2,
        "das": das,
        "pddm_quadruplets": 2,
        "pddm_lr": 0.01,
    }
    cfg = TrainConfig.from_mapping(values)
    criterion = build_criterion(cfg, num_classes=10)
    unit = (criterion.loss if loss_name == "pddm" else criterion.miner).unit
    assert isinstance(unit, PDDMUnit) and unit.dim == 16
    # The unit's parameters form the "pddm" group, with pddm_lr.
    groups = criterion.param_groups(cfg)
    pddm_groups = [g for g in groups if g["name"] == "pddm"]
    assert len(pddm_groups) == 1 and pddm_groups[0]["lr"] == 0.01
    assert {id(p) for p in pddm_groups[0]["params"]} == {id(p) for p in unit.parameters()}
    # Checkpoints carry the unit.
    state = criterion.state_dict()
    unit_keys = [k for k in state if "unit." in k]
    assert {f"{prefix}unit.{k}" for k in unit.state_dict()} == set(unit_keys)
    clone = build_criterion(cfg, num_classes=10)
    clone.load_state_dict(state)

    net = torch.nn.Linear(12, 16)
    opt = torch.optim.Adam([{"params": list(net.parameters()), "name": "net"}, *groups], lr=cfg.lr)
    before = [p.detach().clone() for p in unit.parameters()]
    inputs = torch.randn(8, 12)
    labels = torch.arange(4).repeat_interleave(2)
    value = criterion(F.normalize(net(inputs), dim=1), labels)
    assert torch.isfinite(value)
    opt.zero_grad()
    value.backward()
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, unit.parameters(), strict=True))


def test_build_criterion_applies_pddm_options() -> None:
    cfg = TrainConfig.from_mapping(
        {
            "loss": "pddm",
            "miner": "none",
            "pddm_alpha": 0.3,
            "pddm_beta": 0.7,
            "pddm_lambda": 0.2,
            "pddm_quadruplets": 4,
        }
    )
    loss = build_criterion(cfg, 10).loss
    assert isinstance(loss, PDDMLoss)
    assert (loss.alpha, loss.beta, loss.lam, loss.num_quadruplets) == (0.3, 0.7, 0.2, 4)
    miner = build_criterion(TrainConfig.from_mapping({"miner": "pddm", "pddm_alpha": 0.3}), 10).miner
    assert isinstance(miner, PDDMMiner) and miner.alpha == 0.3
