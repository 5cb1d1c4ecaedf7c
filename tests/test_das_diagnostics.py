"""Issue 11: the options that test why DAS helps or hurts (--das-grad-norm,
--das-exclude-own-copies) and the per-epoch DAS diagnostics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from das_core.training.config import ConfigError, TrainConfig
from das_core.training.diagnostics import DASDiagnostics, weight_norms
from das_core.training.losses import build_criterion, drop_own_copies


def _cfg(**kw: object) -> TrainConfig:
    base = {"embedding_dim": 16, "batch_size": 12, "samples_per_class": 2, "das": True}
    return TrainConfig.from_mapping({**base, **kw})


def _batch(seed: int = 0, b: int = 12, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_(True)
    return emb, torch.arange(b // 2).repeat_interleave(2)


def test_drop_own_copies_on_hand_listed_tuples() -> None:
    # 2 real embeddings (rows 0, 1), T = 1: rows 2, 3 are copies of 0, 1.
    source = torch.tensor([0, 1, 0, 1])
    a, p, n = torch.tensor([0, 0, 2, 1]), torch.tensor([2, 1, 1, 3]), torch.tensor([5, 5, 5, 5])
    ka, kp, kn = drop_own_copies((a, p, n), source)
    assert list(zip(ka.tolist(), kp.tolist(), strict=True)) == [(0, 1), (2, 1)]
    assert kn.tolist() == [5, 5]
    a1, pp, a2, nn_ = torch.tensor([0, 2, 1]), torch.tensor([2, 1, 3]), torch.tensor([0, 1]), torch.tensor([1, 2])
    out = drop_own_copies((a1, pp, a2, nn_), source)
    assert out[0].tolist() == [2] and out[1].tolist() == [1]
    assert out[2].tolist() == [0, 1] and out[3].tolist() == [1, 2]  # negative pairs are never own copies


def test_exclude_own_copies_scores_the_filtered_tuples() -> None:
    """With --miner none the contrastive loss sees every pair; with the option, the loss equals
    PML's loss on all pairs of the DAS batch minus those of an embedding and its own copy."""
    from pytorch_metric_learning.losses import ContrastiveLoss
    from pytorch_metric_learning.utils.loss_and_miner_utils import get_all_pairs_indices

    from das_core.training.losses import _lp_distance

    cfg = _cfg(loss="contrastive", miner="none", das_exclude_own_copies=True)
    emb, y = _batch()
    crit = build_criterion(cfg, 6)
    torch.manual_seed(3)
    got = crit(emb, y)
    reference = build_criterion(cfg.replace(das_exclude_own_copies=False), 6)
    torch.manual_seed(3)
    emb_all, labels_all = reference.das(emb, y)
    source = torch.arange(12).repeat(4)
    a1, p, a2, n = get_all_pairs_indices(labels_all)
    keep = source[a1] != source[p]
    expected = ContrastiveLoss(pos_margin=0.0, neg_margin=1.0, distance=_lp_distance())(
        emb_all, labels_all, (a1[keep], p[keep], a2, n)
    )
    # same float32 operations on the same tensors in the same order: bit-identical
    assert torch.equal(got.detach(), expected.detach())
    unfiltered = reference.loss(emb_all, labels_all, (a1, p, a2, n))
    assert not torch.equal(unfiltered.detach(), got.detach())  # the filter did drop pairs


def test_grad_norm_matches_the_baseline_gradient_on_the_real_embeddings() -> None:
    cfg = _cfg(loss="contrastive", miner="none", das_grad_norm=True)
    emb, y = _batch(1)
    (g_das,) = torch.autograd.grad(build_criterion(cfg, 6)(emb, y), emb)
    (g_base,) = torch.autograd.grad(build_criterion(cfg.replace(das=False), 6)(emb, y), emb)
    (g_plain,) = torch.autograd.grad(build_criterion(cfg.replace(das_grad_norm=False), 6)(emb, y), emb)
    # The scale is |g_base| / |g_das| computed from the same float32 gradients, so the norms agree
    # to float32 rounding of a few reductions over 192 numbers (relative 1e-5 is ample).
    assert torch.linalg.vector_norm(g_das) == pytest.approx(float(torch.linalg.vector_norm(g_base)), rel=1e-5)
    # ... and without the option the DAS gradient is smaller (the imbalance being corrected)
    assert torch.linalg.vector_norm(g_plain) < 0.8 * torch.linalg.vector_norm(g_base)


def test_exclude_own_copies_refused_without_tuples() -> None:
    with pytest.raises(ConfigError, match="das_exclude_own_copies"):
        _cfg(loss="proxy-anchor", miner="none", das_exclude_own_copies=True)


def test_cli_flags_exist() -> None:
    from das_core.cli import build_parser

    ns = build_parser().parse_args(
        ["train", "--das", "--das-grad-norm", "--das-exclude-own-copies", "--optimizer", "adamw",
         "--das-diagnostics-steps", "2"]
    )
    assert ns.das_grad_norm and ns.das_exclude_own_copies and ns.optimizer == "adamw"
    assert ns.das_diagnostics_steps == 2


def test_measuring_does_not_change_training() -> None:
    """Two steps with and without diagnostics: same losses, same DAS state (the RNG is restored)."""
    cfg = _cfg(loss="triplet", miner="distance-weighted")
    runs = []
    for measure in (False, True):
        crit = build_criterion(cfg, 12)
        diag = DASDiagnostics(2) if measure else None
        crit.diagnostics = diag
        if diag is not None:
            diag.start_epoch(2)
        torch.manual_seed(0)
        losses = [float(crit(*_batch(s)).detach()) for s in range(2)]
        runs.append((losses, crit.das.bank.clone(), diag))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])
    summary = runs[1][2].summary()
    for key in ("share_produced", "share_own_copy", "share_active", "grad_ratio", "grad_real_terms",
                "grad_produced_terms", "loss_real", "loss_produced", "bank_age_steps", "produced_offset"):
        assert key in summary and math.isfinite(summary[key]), key
    assert 0 < summary["share_own_copy"] < 1  # T = 3 copies of every anchor are positives of it
    assert summary["share_produced"] > 0.5


def test_own_copy_share_is_zero_when_excluded() -> None:
    crit = build_criterion(_cfg(loss="triplet", miner="semi-hard", das_exclude_own_copies=True), 6)
    diag = DASDiagnostics(1)
    crit.diagnostics = diag
    diag.start_epoch(1)
    crit(*_batch())
    assert diag.summary()["share_own_copy"] == 0.0


def test_bank_age_counts_steps_since_each_row_was_written() -> None:
    """Z = 3, 2 images per class (2 ordered pairs per appearance). Class 0 appears at steps 1,
    2, 3; class 1 at steps 1 and 3. Written: class 0 slots (0, 1) at 1, (2, 0) at 2, (1, 2) at 3
    -> ages at step 3: (1, 0, 0); class 1 slots (0, 1) at 1, (2, 0) at 3 -> ages (0, 2, 0).
    Step 3's batch (two images each of classes 0 and 1) uses rows of mean age (1/3 + 2/3) / 2."""
    cfg = _cfg(loss="triplet", miner="distance-weighted", das_bank_size=3, batch_size=4)
    crit = build_criterion(cfg, 3)
    diag = DASDiagnostics(0)
    crit.diagnostics = diag
    diag.start_epoch(3)
    for step, classes in enumerate(([0, 1], [0, 2], [0, 1])):
        emb = F.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(step)), dim=1)
        crit(emb.requires_grad_(True), torch.tensor(classes).repeat_interleave(2))
    assert diag._age is not None
    assert float(diag._age) == pytest.approx(0.5, abs=1e-6)  # 0.5 = 4 / 8 exactly in float32


def test_weight_norms_are_the_l2_norms() -> None:
    from das_core.models import build_model

    model = build_model(TrainConfig.from_mapping({"embedding_dim": 8}))
    norms = weight_norms(model)
    embed = math.sqrt(sum(float(p.pow(2).sum()) for p in model.embed.parameters()))
    # the same float32 sums of squares per tensor, added in float64: equal (rel 1e-6 = 16 ulps)
    assert norms["embed"] == pytest.approx(embed, rel=1e-6)
    assert norms["total"] >= max(norms["backbone"], norms["embed"])
