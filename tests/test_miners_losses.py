from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from das_core.training.config import LOSSES, MINERS, TrainConfig
from das_core.training.losses import build_criterion
from das_core.training.miners import (
    DistanceWeightedMiner,
    RandomMiner,
    SemiHardMiner,
    SoftHardMiner,
    build_miner,
    pairwise_distances,
)


def _batch(n_classes: int = 6, per_class: int = 4, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n_classes * per_class, dim, generator=g), dim=1)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    return x, y


def _check_triplets(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, y: torch.Tensor) -> None:
    assert len(a) == len(p) == len(n)
    assert torch.all(y[a] == y[p]) and torch.all(a != p)
    assert torch.all(y[a] != y[n])


def test_pairwise_distances_match_cdist() -> None:
    x, _ = _batch()
    # Against float64 distances of the same float32 points (not float32 cdist, whose kernel and
    # rounding vary): |a|^2 + |b|^2 - 2 a.b of unit vectors in float32 is off by at most
    # (d + 2)·2^-24·(|a| + |b|)^2 = e, which moves a distance r by <= e / (2r), plus sqrt's half-ulp.
    ref = torch.cdist(x.double(), x.double())
    off = ~torch.eye(len(x), dtype=torch.bool)
    e = (x.shape[1] + 2) * 2.0**-24 * 4
    tol = e / (2 * ref[off]) + 2.0**-24 * ref[off]
    assert ((pairwise_distances(x).double()[off] - ref[off]).abs() <= tol).all()
    assert torch.all(pairwise_distances(x).diagonal() == 0)


@pytest.mark.parametrize("miner", [RandomMiner(), SemiHardMiner(0.2), SoftHardMiner(), DistanceWeightedMiner(0.5)])
def test_one_valid_triplet_per_anchor(miner: torch.nn.Module) -> None:
    x, y = _batch()
    a, p, n = miner(x, y)
    assert torch.equal(a, torch.arange(len(y)))
    _check_triplets(a, p, n, y)


def test_anchors_without_positive_are_skipped() -> None:
    x, _ = _batch(4, 2)
    y = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5])  # anchors 4..7 have no positive
    a, p, n = SemiHardMiner(0.2)(x, y)
    assert a.tolist() == [0, 1, 2, 3]
    _check_triplets(a, p, n, y)


def test_semi_hard_negative_is_semi_hard_whenever_one_exists() -> None:
    torch.manual_seed(0)
    x, y = _batch(8, 4, dim=8, seed=1)
    d = torch.cdist(x, x)
    margin = 0.3
    for _ in range(20):
        a, p, n = SemiHardMiner(margin)(x, y)
        for ai, pi, ni in zip(a.tolist(), p.tolist(), n.tolist(), strict=True):
            neg = y != y[ai]
            semi = neg & (d[ai] > d[ai, pi]) & (d[ai] < d[ai, pi] + margin)
            if semi.any():
                assert semi[ni], "a semi-hard negative existed but another was chosen"


def test_soft_hard_picks_violating_tuples_when_they_exist() -> None:
    torch.manual_seed(0)
    x, y = _batch(6, 4, dim=8, seed=2)
    d = torch.cdist(x, x)
    a, p, n = SoftHardMiner()(x, y)
    for ai, pi, ni in zip(a.tolist(), p.tolist(), n.tolist(), strict=True):
        pos = (y == y[ai]) & (torch.arange(len(y)) != ai)
        neg = y != y[ai]
        hard_pos = pos & (d[ai] > d[ai][neg].min())
        hard_neg = neg & (d[ai] < d[ai][pos].max())
        if hard_pos.any():
            assert hard_pos[pi]
        if hard_neg.any():
            assert hard_neg[ni]


def test_distance_weighted_follows_the_inverse_sphere_density() -> None:
    """Empirical negative frequencies match q(d)^-1 normalised, within sampling error."""
    torch.manual_seed(0)
    dim = 8
    x, y = _batch(3, 2, dim=dim, seed=3)
    miner = DistanceWeightedMiner(0.5)
    d = torch.cdist(x, x).clamp(0.5, 2 - 1e-3).double()
    logw = (2 - dim) * d.log() - (dim - 3) / 2 * torch.log1p(-d * d / 4)
    anchor = 0
    neg = y != y[anchor]
    w = torch.where(neg, (logw[anchor] - logw[anchor][neg].max()).exp(), torch.zeros(len(y), dtype=torch.float64))
    expected = w / w.sum()
    counts = torch.zeros(len(y), dtype=torch.float64)
    trials = 4000
    for _ in range(trials):
        _, _, n = miner(x, y)
        counts[n[0]] += 1
    freq = counts / trials
    assert torch.all(freq[~neg] == 0)
    # sampling error, not rounding: a frequency over 4,000 draws has σ <= sqrt(0.25 / trials),
    # and 4σ is exceeded with chance 6e-5 per entry
    assert torch.allclose(freq, expected, atol=4 * math.sqrt(0.25 / trials))


def test_unknown_miner_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="valid miners are"):
        build_miner("hardest")


def _combos() -> list[tuple[str, str]]:
    out = []
    for loss in LOSSES:
        if loss == "pddm":
            continue  # covered by tests/test_pddm.py
        for miner in MINERS:
            if miner == "pddm":
                continue
            try:
                TrainConfig.from_mapping({"loss": loss, "miner": miner, "embedding_dim": 16})
            except ValueError:
                continue
            out.append((loss, miner))
    return out


@pytest.mark.parametrize("das", [False, True])
@pytest.mark.parametrize(("loss", "miner"), _combos())
def test_every_loss_and_miner_trains_with_and_without_das(loss: str, miner: str, das: bool) -> None:
    torch.manual_seed(0)
    cfg = TrainConfig.from_mapping(
        {"loss": loss, "miner": miner, "embedding_dim": 16, "das": das, "batch_size": 24, "samples_per_class": 4}
    )
    crit = build_criterion(cfg, num_classes=6)
    raw = torch.randn(24, 16, requires_grad=True)
    x = F.normalize(raw, dim=1)
    y = torch.arange(6).repeat_interleave(4)
    out = crit(x, y)
    assert out.ndim == 0 and torch.isfinite(out)
    out.backward()
    assert raw.grad is not None and torch.isfinite(raw.grad).all()
    if das:
        assert crit.das is not None and crit.das.frequency.sum() == 24 * cfg.das_topk


def test_proxy_losses_get_their_own_parameter_group() -> None:
    cfg = TrainConfig.from_mapping({"loss": "proxy-anchor", "miner": "none", "lr": 1e-4, "loss_lr": 1e-2})
    crit = build_criterion(cfg, num_classes=5)
    groups = crit.param_groups(cfg)
    assert [g["name"] for g in groups] == ["loss"]
    assert groups[0]["lr"] == 1e-2
    assert groups[0]["params"][0].shape == (5, cfg.embedding_dim)
    margin = build_criterion(TrainConfig.from_mapping({"loss": "margin", "lr": 1e-4}), num_classes=5)
    (group,) = margin.param_groups(TrainConfig.from_mapping({"loss": "margin", "lr": 1e-4}))
    assert group["lr"] == pytest.approx(1e-2)  # default: 100 x lr for the learnable beta (float64 product: 1 ulp)


def test_aux_loss_variant_adds_the_real_only_term() -> None:
    torch.manual_seed(0)
    base = {"loss": "contrastive", "miner": "none", "embedding_dim": 16, "das": True}
    x = F.normalize(torch.randn(12, 16), dim=1)
    y = torch.arange(3).repeat_interleave(4)
    plain = build_criterion(TrainConfig.from_mapping({**base, "das_aux_weight": 0.0}), 3)
    aux = build_criterion(TrainConfig.from_mapping({**base, "das_aux_weight": 0.5}), 3)
    real_only = build_criterion(TrainConfig.from_mapping({**base, "das": False}), 3)
    torch.manual_seed(1)
    l_all = plain(x, y)
    torch.manual_seed(1)
    l_aux = aux(x, y)
    # the criterion computes exactly this expression with the same ops on the same tensors (and
    # the same seed for DAS's draws), so the two agree bit for bit; 1e-6 is ~8 ulps of a loss < 2
    assert torch.allclose(l_aux, real_only(x, y) + 0.5 * l_all, atol=1e-6)


def test_das_normalize_off_is_not_undone_by_the_distance() -> None:
    """With das_normalize off, produced rows are not unit length and the loss must see that."""
    from das_core.training.losses import _lp_distance

    dist = _lp_distance()
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert dist(x)[0, 1] == pytest.approx(math.sqrt(5.0))  # float32 sqrt(5) (exact 2^2 + 1^2): 1 half-ulp, rel 6e-8
