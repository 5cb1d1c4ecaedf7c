"""The dense triplet criterion (das_core/training/triplet_dense.py) against today's path: the
batch miner's index lists into pytorch-metric-learning's ``TripletMarginLoss``.

Tolerances, where a test has one:
* the CPU path runs PML's ops in PML's order on the same entries (gathered instead of
  indexed; the counted losses compacted before the sum as PML's reducer does): value and
  gradient are compared with ``torch.equal``;
* the fixed-shape (CUDA) path sums the same ``k`` non-negative losses over ``N`` slots, zeros
  in the others, which the vectorised sum groups differently. Each side's sum is within
  ``(k-1)·eps·sum|x|`` of the exact one (recursive summation; torch's cascade is tighter), so
  the means differ by at most ``2 (N-1) eps`` relative, ``eps`` the unit roundoff
  (``fixed_rtol``). Its gradient does not depend on that sum: ``torch.equal``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from dispatch_helpers import criterion_steps, data_dependent_ops, diagnostics_summary
from torch.utils._python_dispatch import TorchDispatchMode

from das_core.training.config import TrainConfig
from das_core.training.losses import Criterion, build_criterion, drop_own_copies
from das_core.training.miners import (
    DistanceWeightedMiner,
    RandomMiner,
    SemiHardMiner,
    SoftHardMiner,
    TripletMiner,
)
from das_core.training.triplet_dense import DenseTriplet, dense_triplet

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")

MINERS = ("random", "semi-hard", "soft-hard", "distance-weighted")
FORMS = ("plain", "squared")


def _miner(name: str) -> TripletMiner:
    return {"random": RandomMiner(), "semi-hard": SemiHardMiner(0.2), "soft-hard": SoftHardMiner(),
            "distance-weighted": DistanceWeightedMiner(0.5)}[name]


def _loss(form: str) -> Any:
    """The loss losses._triplet builds (PML's default form, or the authors' squared one)."""
    if form == "squared":
        return pml_losses.TripletMarginLoss(
            margin=0.2,
            distance=pml_distances.LpDistance(normalize_embeddings=False, p=2, power=2),
            reducer=pml_reducers.MeanReducer(),
        )
    return pml_losses.TripletMarginLoss(margin=0.2, distance=pml_distances.LpDistance(normalize_embeddings=False, p=2))


def _value_and_grad(fn: Any, emb: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)  # the miners draw from the global generator: the same draws on both paths
    e = emb.clone().requires_grad_()
    v = fn(e, labels)
    (g,) = torch.autograd.grad(v, e, allow_unused=True)
    return v.detach(), torch.zeros_like(e) if g is None else g


def fixed_rtol(n: int, dtype: torch.dtype) -> float:
    return 2 * max(n - 1, 1) * torch.finfo(dtype).eps / 2  # finfo.eps is 2 units of roundoff


def _check(
    miner: TripletMiner, form: str, emb: torch.Tensor, labels: torch.Tensor, seed: int,
    source: torch.Tensor | None = None,
) -> torch.Tensor:
    """Both dense paths against the index lists; returns the reference value."""
    loss = _loss(form)

    def lists(e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        indices = miner(e, y)
        if source is not None:
            indices = drop_own_copies(indices, source)
        out: torch.Tensor = loss(e, y, indices)
        return out

    dense = dense_triplet(loss, miner)
    assert dense is not None and dense.fixed_shape is None
    v_ref, g_ref = _value_and_grad(lists, emb, labels, seed)
    v, g = _value_and_grad(lambda e, y: dense(e, y, source), emb, labels, seed)
    assert torch.equal(v, v_ref) and torch.equal(g, g_ref)
    dense.fixed_shape = True
    v, g = _value_and_grad(lambda e, y: dense(e, y, source), emb, labels, seed)
    torch.testing.assert_close(v, v_ref, rtol=fixed_rtol(len(labels), emb.dtype), atol=0.0)
    assert torch.equal(g, g_ref)
    return v_ref


def _batch(gen: torch.Generator, n: int, classes: int, dim: int = 32, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, classes, (n,), generator=gen)
    emb = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen, dtype=dtype), dim=1)
    return emb, labels


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("miner", MINERS)
def test_dense_triplet_matches_index_lists_to_the_bit(miner: str, form: str) -> None:
    """Random labels: some anchors have no positive (PML never sees them, the dense path masks
    them); float32 and float64, a plain and a DAS-enlarged batch size."""
    gen = torch.Generator().manual_seed(len(miner) * 10 + len(form))
    nonzero = 0
    for trial, (n, dtype) in enumerate([(12, torch.float64), (40, torch.float32), (112, torch.float32), (448, torch.float32)]):
        emb, labels = _batch(gen, n, classes=max(2, n // 3), dtype=dtype)
        v = _check(_miner(miner), form, emb, labels, seed=trial)
        nonzero += int(v != 0)
    assert nonzero >= 3  # the comparison is not between two zeros


@pytest.mark.parametrize("miner", MINERS)
def test_dense_triplet_draws_the_same_random_numbers(miner: str) -> None:
    """So a training run draws the same numbers whichever path runs (the trainer's RNG goes on)."""
    emb, labels = _batch(torch.Generator().manual_seed(1), 60, 20)
    m = _miner(miner)
    states = []
    for run in (lambda: m(emb, labels), lambda: m.mine(emb, labels), lambda: dense_triplet(_loss("plain"), m)(emb, labels)):
        torch.manual_seed(2)
        run()
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1]) and torch.equal(states[0], states[2])
    torch.manual_seed(2)
    a, p, n = m(emb, labels)
    torch.manual_seed(2)
    p_all, n_all, valid = m.mine(emb, labels)
    assert torch.equal(a, torch.arange(60)[valid]) and torch.equal(p, p_all[valid]) and torch.equal(n, n_all[valid])


@pytest.mark.parametrize("form", FORMS)
def test_dense_triplet_zero_loss_cases(form: str) -> None:
    """PML's zero loss (zero gradient): no triplet at all (every label distinct; one class), and
    every triplet satisfied (classes far apart: no non-zero loss for the default form)."""
    gen = torch.Generator().manual_seed(3)
    for labels in (torch.arange(6), torch.zeros(6, dtype=torch.long)):
        emb = torch.randn(6, 8, generator=gen)
        assert float(_check(RandomMiner(), form, emb, labels, seed=0)) == 0.0
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    emb = torch.eye(8)[labels] * 10 + 0.01 * torch.randn(6, 8, generator=gen)
    v = _check(SemiHardMiner(0.2), form, emb, labels, seed=0)
    assert float(v) == 0.0
    dense = dense_triplet(_loss(form), SemiHardMiner(0.2))
    assert dense is not None
    _, g = _value_and_grad(dense, emb, labels, seed=0)
    assert not g.any()


def test_dense_triplet_on_das_produced_rows_and_own_copies() -> None:
    """A DAS-enlarged batch, with and without --das-exclude-own-copies (drop_own_copies)."""
    from das_core.training.das import DenselyAnchoredSampling

    torch.manual_seed(3)
    das = DenselyAnchoredSampling(6, 16, num_produce=3, topk=2).double()
    gen = torch.Generator().manual_seed(4)
    for step in range(3):  # the first calls fill the bank, later ones produce from it
        labels = torch.arange(6).repeat_interleave(2)
        emb = torch.nn.functional.normalize(torch.randn(12, 16, generator=gen, dtype=torch.float64), dim=1)
        emb_all, labels_all = das(emb, labels)
        assert len(emb_all) == 4 * len(emb)
        source = torch.arange(12).repeat(4)
        for name in MINERS:
            for form in FORMS:
                _check(_miner(name), form, emb_all.detach(), labels_all, seed=step)
                _check(_miner(name), form, emb_all.detach(), labels_all, seed=step, source=source)


def _criterion(miner: str, **extra: Any) -> Criterion:
    cfg = TrainConfig.from_mapping({"loss": "triplet", "miner": miner, "embedding_dim": 16, **extra})
    return build_criterion(cfg, 6)


def test_criterion_uses_dense_triplet_where_equivalent() -> None:
    for miner in MINERS:
        for form in FORMS:
            crit = _criterion(miner, triplet_form=form)
            assert crit.dense_triplet is not None and crit.dense_triplet.miner is crit.miner
            assert crit.dense_triplet.nonzero_mean == (form == "plain")
    # Not equivalent: no miner (every triplet), a pair miner, PML options the dense loss lacks.
    assert _criterion("none").dense_triplet is None
    assert _criterion("multi-similarity").dense_triplet is None
    assert _criterion("semi-hard", loss="contrastive").dense_triplet is None
    assert dense_triplet(pml_losses.TripletMarginLoss(swap=True), RandomMiner()) is None
    assert dense_triplet(pml_losses.TripletMarginLoss(smooth_loss=True), RandomMiner()) is None
    other = pml_losses.TripletMarginLoss(reducer=pml_reducers.ThresholdReducer(low=0.1))
    assert dense_triplet(other, RandomMiner()) is None


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("miner", MINERS)
def test_criterion_same_with_and_without_dense_triplet(miner: str, exclude: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole criterion with DAS: the same value, gradient and DAS state on either path."""
    import das_core.training.losses as losses

    crit = _criterion(miner, das=True, das_num_produce=2, das_topk=2, das_exclude_own_copies=exclude)
    gen = torch.Generator().manual_seed(7)
    labels = torch.arange(6).repeat_interleave(2)
    emb = torch.nn.functional.normalize(torch.randn(12, 16, generator=gen), dim=1)
    assert crit.das is not None
    crit.das(emb, labels)  # fill the bank so the criterion's DAS produces
    state = {k: v.clone() for k, v in crit.state_dict().items()}
    results, states = [], []
    for dense in (False, True):
        monkeypatch.setattr(losses, "DENSE_TRIPLET_ON_CPU", dense)
        crit.load_state_dict(state)
        results.append(_value_and_grad(crit, emb, labels, seed=8))
        states.append(crit.state_dict())
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("miner", MINERS)
def test_dense_triplet_criterion_has_no_data_dependent_ops(miner: str, form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What becomes a host synchronisation on CUDA, caught on the CPU: the criterion's CUDA
    (fixed-shape) path mines and scores, forward and backward, without a data-dependent op, on a
    plain batch and on a DAS-enlarged one (DAS itself is checked in its own tests: its CPU path
    is allowed syncs). The CPU path has one, on purpose (the compacted sum: PML's value to the
    bit); today's index lists have several."""
    import das_core.training.losses as losses

    plain = _criterion(miner, triplet_form=form)
    crit = _criterion(miner, triplet_form=form, das=True, das_num_produce=2, das_topk=2)
    gen = torch.Generator().manual_seed(10)
    labels = torch.arange(6).repeat_interleave(2)
    emb = torch.nn.functional.normalize(torch.randn(12, 16, generator=gen), dim=1)
    plain_step, das_step = criterion_steps(plain, crit, emb, labels)

    monkeypatch.setattr(losses, "DENSE_TRIPLET_ON_CPU", True)
    for c in (plain, crit):
        assert c.dense_triplet is not None
        c.dense_triplet.fixed_shape = True
    assert data_dependent_ops(plain_step) == []
    assert data_dependent_ops(das_step) == []
    for c in (plain, crit):
        assert c.dense_triplet is not None
        c.dense_triplet.fixed_shape = None  # the CPU path: the compacted sum's index and its backward
    assert data_dependent_ops(plain_step) == ["index with a boolean mask", "index_put with a boolean mask"]
    # The check can fail: today's index lists are caught by it.
    monkeypatch.setattr(losses, "DENSE_TRIPLET_ON_CPU", False)
    assert len(data_dependent_ops(plain_step)) >= 3


@pytest.mark.parametrize("miner", ["semi-hard", "distance-weighted"])
def test_das_diagnostics_same_with_dense_triplet(miner: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A diagnostics step lists the dense loss's triplets for DASDiagnostics: the same figures
    as with the index lists (the same triplets in the same order)."""
    import das_core.training.losses as losses
    summaries = []
    for dense in (False, True):
        monkeypatch.setattr(losses, "DENSE_TRIPLET_ON_CPU", dense)
        crit = _criterion(miner, das=True, das_num_produce=2, das_topk=2, das_exclude_own_copies=True)
        gen = torch.Generator().manual_seed(12)
        labels = torch.arange(6).repeat_interleave(2)
        batches = [(torch.nn.functional.normalize(torch.randn(12, 16, generator=gen), dim=1), labels) for _ in range(2)]
        torch.manual_seed(13)
        summaries.append(diagnostics_summary(crit, batches))
    assert summaries[0].keys() == summaries[1].keys() and "share_active" in summaries[0]
    assert summaries[0] == summaries[1]


def test_dense_triplet_is_not_a_module() -> None:
    """It holds no state: the criterion's state_dict (checkpoints) is the same either way."""
    crit = _criterion("semi-hard")
    assert isinstance(crit.dense_triplet, DenseTriplet)
    assert not any("dense" in k for k in crit.state_dict())


@pytest.mark.parametrize(("miner", "form"), [("random", "plain"), ("distance-weighted", "squared")])
def test_digits_run_history_same_with_dense_triplet(
    miner: str, form: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short digits run with DAS trains exactly as before: every figure of metrics.jsonl but
    the timings is equal (train loss included), whichever path runs on the CPU. The random
    miner averaging the non-zero losses is the case where the fixed-shape sum would differ in
    the last bits of the logged loss."""
    import das_core.training.losses as losses
    from conftest import QUICK_DIGITS
    from das_core.cli import main
    from das_core.store.io import read_jsonl

    histories = []
    for dense in (False, True):
        monkeypatch.setattr(losses, "DENSE_TRIPLET_ON_CPU", dense)
        out = tmp_path / f"run-{dense}"
        args = ["train", *QUICK_DIGITS, "--das", "--seed", "3", "--miner", miner, "--triplet-form", form, "--out", str(out)]
        assert main(args) == 0
        rows = read_jsonl(out / "metrics.jsonl")
        histories.append([{k: v for k, v in r.items() if "time" not in k and not k.endswith("_s")} for r in rows])
    assert histories[0] == histories[1] and "train_loss" in histories[0][0]


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


# ATen ops (every call below autograd, views included) of one forward + backward of the
# fixed-shape (CUDA) criterion on a DAS-enlarged paper batch (N = 4 x 112, d = 512), measured
# when it was written. The index lists it replaced ran 82 (random), 91 (semi-hard) and 96
# (soft-hard, distance-weighted) ops in either form, of which 5 (default form: the miner's
# three boolean indexings, the reducer's and its backward) or 3 (squared form) are
# data-dependent, a host synchronisation each on CUDA; the dense path runs 7-9 more ops, none
# data-dependent. A proxy of the launch overhead that runs anywhere; 3 ops of margin.
OPS_FIXED = {
    ("random", "plain"): 89, ("random", "squared"): 91,
    ("semi-hard", "plain"): 98, ("semi-hard", "squared"): 100,
    ("soft-hard", "plain"): 103, ("soft-hard", "squared"): 105,
    ("distance-weighted", "plain"): 103, ("distance-weighted", "squared"): 105,
}


@pytest.mark.parametrize(("miner", "form"), sorted(OPS_FIXED))
def test_dense_triplet_op_count_at_the_paper_shape(miner: str, form: str) -> None:
    crit = _criterion(miner, triplet_form=form)
    assert crit.dense_triplet is not None
    crit.dense_triplet.fixed_shape = True
    labels = torch.arange(56).repeat_interleave(2).repeat(4)
    emb = torch.nn.functional.normalize(torch.randn(448, 512, generator=torch.Generator().manual_seed(14)), dim=1)
    counter = _OpCounter()
    e = emb.clone().requires_grad_()
    with counter:
        crit(e, labels).backward()
    assert counter.count <= OPS_FIXED[(miner, form)] + 3
