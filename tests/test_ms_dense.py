"""The dense multi-similarity miner + loss (das_core/training/ms_dense.py) against pytorch-metric-learning.

Tolerance: both sides compute the similarity matrix, the masked logsumexp and the mean with
the same torch ops on the same float64 inputs; only the mask construction differs (index
lists vs boolean masks), which decides which entries enter a sum but not how they are
added. A reordering of the summation could still change the result by at most a few ulps of
each sum of <= N = 256 terms, i.e. a relative error below 256 * 2**-52 ~ 6e-14; the tests
use rtol = 1e-12 (and atol = 1e-14 for gradients that are exactly zero on one side).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from dispatch_helpers import criterion_steps, diagnostics_summary
from dispatch_helpers import data_dependent_ops as _ops

from das_core.training.config import TrainConfig
from das_core.training.losses import Criterion, build_criterion
from das_core.training.ms_dense import DenseMultiSimilarity, dense_multi_similarity

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

RTOL, ATOL = 1e-12, 1e-14


def _pml(emb: torch.Tensor, labels: torch.Tensor, eps: float | None, beta: float = 50.0) -> torch.Tensor:
    loss = pml_losses.MultiSimilarityLoss(alpha=2.0, beta=beta, base=0.5)
    if eps is None:
        out: torch.Tensor = loss(emb, labels)
        return out
    indices = pml_miners.MultiSimilarityMiner(epsilon=eps)(emb, labels)
    out = loss(emb, labels, indices)
    return out


def _value_and_grad(fn: Any, emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    e = emb.clone().requires_grad_()
    v = fn(e, labels)
    (g,) = torch.autograd.grad(v, e, allow_unused=True)
    return v.detach(), torch.zeros_like(e) if g is None else g


def _check(emb: torch.Tensor, labels: torch.Tensor, eps: float | None, beta: float = 50.0) -> torch.Tensor:
    dense = DenseMultiSimilarity(2.0, beta, 0.5, eps)
    v_ref, g_ref = _value_and_grad(lambda e, y: _pml(e, y, eps, beta), emb, labels)
    v, g = _value_and_grad(dense, emb, labels)
    torch.testing.assert_close(v, v_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(g, g_ref, rtol=RTOL, atol=ATOL)
    return v_ref


def _batch(gen: torch.Generator, classes: int, per_class: int, dim: int = 16, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(classes).repeat_interleave(per_class)
    centres = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    emb = centres[labels] + spread * torch.randn(len(labels), dim, generator=gen, dtype=torch.float64)
    perm = torch.randperm(len(labels), generator=gen)
    return emb[perm], labels[perm]


@pytest.mark.parametrize("eps", [0.1, 0.3, None])
@pytest.mark.parametrize("per_class", [2, 4])
def test_dense_ms_matches_pml_on_random_batches(eps: float | None, per_class: int) -> None:
    gen = torch.Generator().manual_seed(per_class * 100 + (0 if eps is None else int(eps * 10)))
    nonzero = 0
    for trial in range(12):
        emb, labels = _batch(gen, classes=3 + trial, per_class=per_class, spread=0.3 + 0.2 * trial)
        v = _check(emb, labels, eps, beta=50.0 if trial % 2 else 10.0)
        nonzero += int(v != 0)
    assert nonzero >= 10  # the comparison is not between two zeros


def test_dense_ms_matches_pml_on_das_produced_rows() -> None:
    from das_core.training.das import DenselyAnchoredSampling

    torch.manual_seed(3)
    das = DenselyAnchoredSampling(6, 16, num_produce=3, topk=2).double()
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):  # the first calls fill the bank, later ones produce from it
        emb, labels = _batch(gen, classes=6, per_class=2)
        emb = torch.nn.functional.normalize(emb, dim=1)
        emb_all, labels_all = das(emb, labels)
        assert len(emb_all) > len(emb)
        _check(emb_all.detach(), labels_all, 0.1)
        _check(emb_all.detach(), labels_all, None)


def test_dense_ms_matches_pml_when_nothing_or_one_pair_is_mined() -> None:
    # Well separated classes: the miner keeps no pair, PML returns its zero loss.
    gen = torch.Generator().manual_seed(5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    centres = torch.eye(16, dtype=torch.float64)[:3] * 10
    emb = centres[labels] + 0.01 * torch.randn(6, 16, generator=gen, dtype=torch.float64)
    assert float(_check(emb, labels, 0.1)) == 0.0
    # No positive pair at all, no negative pair at all, a single pair of each: PML's rules.
    _check(torch.randn(5, 8, generator=gen, dtype=torch.float64), torch.arange(5), 0.1)
    _check(torch.randn(5, 8, generator=gen, dtype=torch.float64), torch.zeros(5, dtype=torch.long), 0.1)
    assert float(_check(torch.randn(1, 8, generator=gen, dtype=torch.float64), torch.tensor([0]), None)) == 0.0
    assert float(_check(torch.randn(3, 8, generator=gen, dtype=torch.float64), torch.tensor([0, 0, 1]), 2.0)) != 0.0
    # One positive and one negative pair mined: PML's zero loss (it scores nothing then).
    emb = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, pos, neg = DenseMultiSimilarity(2.0, 50.0, 0.5, 0.1).loss_and_pairs(emb, torch.tensor([0, 0, 1]))
    assert (int(pos.sum()), int(neg.sum())) == (1, 1)
    assert float(_check(emb, torch.tensor([0, 0, 1]), 0.1)) == 0.0


def test_dense_ms_matches_pml_with_ties() -> None:
    # Repeated rows make equal similarities: ties at the hardest pair and at the epsilon edge.
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    emb = base[torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 1])]
    labels = torch.tensor([0, 1, 1, 2, 2, 0, 3, 3, 0, 1])
    for eps in (0.0, 0.1, None):
        _check(emb, labels, eps)


def test_dense_ms_is_bit_identical_to_pml_in_float32() -> None:
    """Why the dense path may run on the CPU too (``DENSE_MS_ON_CPU``) without moving any CPU
    result: it runs PML's ops in PML's order on the same inputs (the masks only decide which
    entries are filled with the dtype's minimum), so value and gradient agree to the bit."""
    gen = torch.Generator().manual_seed(11)
    for eps in (0.1, None):
        dense = DenseMultiSimilarity(2.0, 50.0, 0.5, eps)
        for n in (12, 112):
            labels = torch.randint(0, n // 3, (n,), generator=gen)
            emb = torch.nn.functional.normalize(torch.randn(n, 64, generator=gen), dim=1)
            v_ref, g_ref = _value_and_grad(lambda e, y, eps=eps: _pml(e, y, eps), emb, labels)
            v, g = _value_and_grad(dense, emb, labels)
            assert torch.equal(v, v_ref) and torch.equal(g, g_ref)


def _criterion(miner: str, **extra: Any) -> Criterion:
    cfg = TrainConfig.from_mapping({"loss": "multi-similarity", "miner": miner, "embedding_dim": 16, **extra})
    return build_criterion(cfg, 6).double()


@pytest.mark.parametrize("miner", ["multi-similarity", "none"])
def test_criterion_uses_dense_ms_where_equivalent(miner: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import das_core.training.losses as losses

    crit = _criterion(miner, das=True, das_num_produce=2, das_topk=2)
    assert crit.dense_ms is not None
    gen = torch.Generator().manual_seed(7)
    emb, labels = _batch(gen, classes=6, per_class=2)
    emb = torch.nn.functional.normalize(emb, dim=1)
    assert crit.das is not None
    crit.das(emb, labels)  # fill the bank so the criterion's DAS produces
    results = []
    for on_cpu in (False, True):
        monkeypatch.setattr(losses, "DENSE_MS_ON_CPU", on_cpu)
        torch.manual_seed(8)
        state = {k: v.clone() for k, v in crit.state_dict().items()}
        results.append(_value_and_grad(crit, emb, labels))
        crit.load_state_dict(state)
    torch.testing.assert_close(results[1], results[0], rtol=RTOL, atol=ATOL)
    # Not equivalent: another miner, or a loss that is not multi-similarity.
    assert _criterion("semi-hard").dense_ms is None
    assert build_criterion(TrainConfig.from_mapping({"loss": "triplet", "miner": "none"}), 6).dense_ms is None


def test_dense_ms_drops_own_copy_pairs_as_pml_path() -> None:
    from das_core.training.losses import drop_own_copies

    gen = torch.Generator().manual_seed(9)
    emb, labels = _batch(gen, classes=4, per_class=2)
    source = torch.arange(8).repeat(3)
    emb_all = torch.cat([emb, emb.repeat(2, 1) + 0.05 * torch.randn(16, 16, generator=gen, dtype=torch.float64)])
    labels_all = labels.repeat(3)
    loss = pml_losses.MultiSimilarityLoss()
    miner = pml_miners.MultiSimilarityMiner(epsilon=0.1)

    def ref(e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = loss(e, y, drop_own_copies(tuple(miner(e, y)), source))
        return out

    dense = dense_multi_similarity(loss, miner)
    assert dense is not None
    v_ref, g_ref = _value_and_grad(ref, emb_all, labels_all)
    v, g = _value_and_grad(lambda e, y: dense(e, y, source), emb_all, labels_all)
    torch.testing.assert_close(v, v_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(g, g_ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("miner", ["multi-similarity", "none"])
def test_dense_ms_criterion_has_no_data_dependent_ops(miner: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What becomes a host synchronisation on CUDA, caught on the CPU: mining and loss,
    forward and backward, run without a data-dependent op, on a plain batch and on a
    DAS-enlarged one (DAS itself is checked in its own tests: its CPU path is allowed syncs)."""
    import das_core.training.losses as losses

    plain = _criterion(miner)
    crit = _criterion(miner, das=True, das_num_produce=2, das_topk=2)
    gen = torch.Generator().manual_seed(10)
    emb, labels = _batch(gen, classes=6, per_class=2)
    emb = torch.nn.functional.normalize(emb, dim=1)
    plain_step, das_step = criterion_steps(plain, crit, emb, labels)

    monkeypatch.setattr(losses, "DENSE_MS_ON_CPU", True)
    assert _ops(plain_step) == []
    assert _ops(das_step) == []
    # The check can fail: PML's own path is caught by it.
    monkeypatch.setattr(losses, "DENSE_MS_ON_CPU", False)
    assert "nonzero" in _ops(plain_step)


@pytest.mark.parametrize("exclude", [False, True])
def test_das_diagnostics_same_with_dense_ms(exclude: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A diagnostics step lists the dense loss's pairs for DASDiagnostics: the same figures
    as with PML's miner (pair order differs; every figure is a sum over the pairs)."""
    import das_core.training.losses as losses
    summaries = []
    for on_cpu in (False, True):
        monkeypatch.setattr(losses, "DENSE_MS_ON_CPU", on_cpu)
        crit = _criterion("multi-similarity", das=True, das_num_produce=2, das_topk=2, das_exclude_own_copies=exclude)
        gen = torch.Generator().manual_seed(12)
        batches = [_batch(gen, classes=6, per_class=2) for _ in range(2)]
        torch.manual_seed(13)
        summaries.append(diagnostics_summary(crit, [(torch.nn.functional.normalize(e, dim=1), y) for e, y in batches]))
    assert summaries[0].keys() == summaries[1].keys() and "share_active" in summaries[0]
    for key, value in summaries[0].items():
        assert summaries[1][key] == pytest.approx(value, rel=RTOL, abs=ATOL), key
