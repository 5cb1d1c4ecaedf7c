"""Numbers beside the map: anchors, gap fill, honesty of produced points, DAS state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from das_core.data.sampler import MPerClassBatchSampler
from das_core.explorer import analysis
from das_core.explorer.analysis import (
    bank_summary,
    class_top_dims,
    compute_das_state,
    gap_fill,
    gap_reference,
    preview_shifts,
    produced_honesty,
    select_anchors,
)
from das_core.training.das import DenselyAnchoredSampling


def clustered(n: int = 400, d: int = 8, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d)) * 3.0
    labels = rng.integers(0, classes, n).astype(np.int64)
    x = centers[labels] + rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def assert_no_near_tie(
    points: np.ndarray, real: np.ndarray, labels: np.ndarray, point_labels: np.ndarray,
    exclude: np.ndarray | None = None,
) -> None:
    """Premise of comparing the faiss-backed search with brute force: per point, the two nearest
    real points of its own class (and of the other classes) differ in squared distance (float64)
    by more than twice faiss's float32 error, (d + 2)·2^-24·(|q| + |g|)^2, so that every kernel
    picks the same neighbour."""
    q, g = points.astype(np.float64), real.astype(np.float64)
    d2 = ((q[:, None, :] - g[None]) ** 2).sum(-1)
    if exclude is not None:
        d2[np.arange(len(q)), exclude] = np.inf
    bound = 2 * (q.shape[1] + 2) * 2.0**-24 * (np.linalg.norm(q, axis=1).max() + np.linalg.norm(g, axis=1).max()) ** 2
    for own in (True, False):
        cand = np.where((labels[None] == point_labels[:, None]) == own, d2, np.inf)
        two = np.sort(cand, axis=1)[:, :2]
        gap = two[:, 1] - two[:, 0]
        assert (gap[np.isfinite(gap)] > bound).all(), "fixture has a near-tie float32 cannot decide"


def test_select_anchors_stratified_and_deterministic() -> None:
    y = np.repeat([0, 1, 2], [100, 30, 5])
    a = select_anchors(y, 20, seed=1)
    assert np.bincount(y[a]).tolist() == [20, 20, 5]
    assert len(np.unique(a)) == len(a) and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, select_anchors(y, 20, seed=1))
    assert not np.array_equal(a, select_anchors(y, 20, seed=2))
    only = select_anchors(y, 20, classes=[0, 2], seed=1)
    assert set(y[only].tolist()) == {0, 2}
    # restricting the classes keeps the anchors of the classes that stay
    np.testing.assert_array_equal(only, a[y[a] != 1])
    assert len(select_anchors(y, 0)) == 0


def test_gap_fill_zero_for_copies_and_positive_on_midpoints() -> None:
    x, y = clustered()
    copies = gap_fill(x, y, x.copy(), y.copy())
    # gap fill = 1 - Σb/Σa in float64 over float32 distances recomputed from the vectors
    # (ExactKnn): a copy gives the same float32 distance as its original, so b = a and the
    # value is 0 up to float64 rounding (~1e-16); 1e-6 is far below any real fill (> 0.2 here)
    assert copies["overall"] == pytest.approx(0.0, abs=1e-6)
    assert set(copies["per_class"]) == set(np.unique(y).tolist())
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in copies["per_class"].values())
    ref = gap_reference(x, y)
    on_mid = gap_fill(x, y, ref.midpoints, ref.labels, reference=ref)
    assert on_mid["overall"] == pytest.approx(1.0, abs=1e-6)  # b = |m - m| = 0 exactly: Σb = 0
    # half of the gaps of class 0 filled: about half of that class's fill
    rows = np.flatnonzero(ref.labels == 0)[::2]
    half = gap_fill(x, y, ref.midpoints[rows], ref.labels[rows], reference=ref)
    # (every other gap of class 0 filled exactly: ~0.5 of its Σa, whatever the rounding)
    assert 0.2 < half["per_class"][0] < 0.8 and half["per_class"][1] == pytest.approx(0.0, abs=1e-6)
    # produced points of the wrong class fill nothing
    wrong = gap_fill(x, y, ref.midpoints, (ref.labels + 1) % 4, reference=ref)
    assert wrong["overall"] < on_mid["overall"]
    # measured around anchors only
    anchors = select_anchors(y, 10)
    around = gap_fill(x, y, x[anchors], y[anchors], anchors=anchors)
    assert around["gaps"] == len(anchors) and around["overall"] == pytest.approx(0.0, abs=1e-6)


def test_produced_honesty_hand_made() -> None:
    real = np.array([[0, 0], [0, 1], [1, 0], [10, 0], [10, 1], [11, 0]], np.float32)
    labels = np.array([0, 0, 0, 1, 1, 1])
    produced = np.array([[0.2, 0.2], [9.5, 0.5], [10.4, 0.4]], np.float32)
    plabels = np.array([0, 0, 1])  # the second one sits inside class 1
    h = produced_honesty(real, labels, produced, plabels, anchors=np.array([0, 3]))
    # Expected values from the decimal coordinates; the module sees them rounded to float32
    # (half-ulp <= 4.8e-7 for |x| <= 11) and takes float32 differences and 2-term norms: the
    # distances (>= 0.28) are off by < 2 · 4.8e-7 / 0.28 + 4 · 2^-24 = 4e-6 relative, inside 1e-5
    assert h["fraction_own_closer"] == pytest.approx(2 / 3)
    np.testing.assert_allclose(
        h["own_distance"], [np.hypot(0.2, 0.2), np.hypot(8.5, 0.5), np.hypot(0.4, 0.4)], rtol=1e-5
    )
    np.testing.assert_allclose(h["other_distance"][1], 0.5 * np.sqrt(2), rtol=1e-5)
    assert h["other_class"].tolist() == [1, 1, 0]
    assert h["ratio"][0] < 1 < h["ratio"][1]
    assert h["per_class"][0]["n"] == 2 and h["per_class"][0]["fraction_own_closer"] == 0.5
    assert h["per_class"][1]["fraction_own_closer"] == 1.0
    assert h["anchors"]["fraction_own_closer"] == 1.0  # the real anchors, themselves excluded


def test_compute_das_state_counts_and_banks() -> None:
    x, y = clustered(n=200, d=16, classes=4)
    das = compute_das_state(
        x,
        y,
        4,
        das_kwargs={"topk": 3, "bank_size": 5},
        batch_size=20,
        samples_per_class=5,
        num_batches=12,
        seed=7,
    )
    fed = np.zeros(4, np.int64)
    for batch in MPerClassBatchSampler(y, 20, 5, num_batches=12, seed=7):
        fed += np.bincount(y[batch], minlength=4)
    np.testing.assert_array_equal(das.frequency.sum(dim=1).numpy(), 3 * fed)
    assert (das.bank_filled[torch.as_tensor(fed > 0)] > 0).all()
    # a split with fewer classes than the batch needs: the batch shrinks to fit
    small = compute_das_state(x[y < 2], y[y < 2], 4, batch_size=112, samples_per_class=2)
    assert small.frequency[:2].sum() > 0 and small.frequency[2:].sum() == 0
    # produce() for display leaves the state unchanged
    before = das.frequency.clone(), das.bank.clone()
    out = das.produce(torch.from_numpy(x[:8]), torch.from_numpy(y[:8]), r_b=0.5, num_produce=2)
    assert out.shape == (16, 16)
    assert torch.equal(before[0], das.frequency) and torch.equal(before[1], das.bank)


def test_top_dims_bank_summary_and_preview() -> None:
    das = DenselyAnchoredSampling(2, 6, topk=2, bank_size=3, r_b=0.1)
    with torch.no_grad():
        das.frequency[0] = torch.tensor([0.0, 5.0, 1.0, 5.0, 9.0, 0.0])
    assert class_top_dims(das) == [[4, 1], []]
    assert class_top_dims(das, k=4) == [[4, 1, 3, 2]] + [[]]
    emb = torch.nn.functional.normalize(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    das.update(emb, torch.tensor([0, 0, 1, 1]))
    s = bank_summary(das, 0)
    assert s["filled"] == 2 and s["size"] == 3 and s["transformations"].shape == (2, 6)
    # the same numpy norm of the same float32 rows: equal up to float32 rounding (2^-24 = 6e-8)
    np.testing.assert_allclose(s["norms"], np.linalg.norm(s["transformations"], axis=1), rtol=1e-6)
    v = emb[0].numpy()
    shifted = preview_shifts(das, v, 0, r_b=0.5)
    raw = v[None] + 0.5 * s["transformations"]
    # float32 v + 0.5·t is one rounding (the same op as the module's); its normalisation and
    # ours each round a 6-term norm: relative (d/2 + 2)·2^-24 = 3e-7 apart, inside 1e-5
    np.testing.assert_allclose(shifted, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(preview_shifts(das, v, 0, r_b=0.5, normalize=False), raw, rtol=1e-6)  # one rounding
    assert bank_summary(DenselyAnchoredSampling(2, 6), 1)["filled"] == 0


@pytest.mark.parametrize("per_class_max", [64, 0], ids=["per-class-search", "knn-search"])
def test_produced_honesty_matches_brute_force(per_class_max: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(analysis, "_PER_CLASS_MAX", per_class_max)
    x, y = clustered(n=300, d=8, classes=3, seed=5)
    rng = np.random.default_rng(1)
    pick = rng.choice(300, 40, replace=False)
    produced = x[pick] + rng.normal(scale=0.05, size=(40, 8)).astype(np.float32)
    plabels = y[pick].copy()
    plabels[:5] = (plabels[:5] + 1) % 3  # some deliberately on the wrong side
    h = produced_honesty(x, y, produced, plabels)
    dist = np.linalg.norm(produced[:, None, :] - x[None], axis=2)
    own = np.where(y[None] == plabels[:, None], dist, np.inf).min(axis=1)
    other = np.where(y[None] != plabels[:, None], dist, np.inf).min(axis=1)
    # The module recomputes distances exactly as above (float32 norm of the difference), but
    # faiss picks *which* neighbour from ||q||^2 + ||g||^2 - 2 q.g in float32, off by up to
    # (d + 2)·2^-24·(|q| + |g|)^2 < 3e-6 here (|x| = 1, |produced| < 1.2): a point whose two
    # nearest candidates are closer than that could be decided differently by another kernel.
    # The fixture has none (checked in float64), so the comparison holds on any machine.
    assert_no_near_tie(produced, x, y, plabels)
    np.testing.assert_allclose(h["own_distance"], own, rtol=1e-5)
    np.testing.assert_allclose(h["other_distance"], other, rtol=1e-5)
    assert h["fraction_own_closer"] == pytest.approx(float((own < other).mean()))
    anchors = select_anchors(y, 10, seed=3)
    base = produced_honesty(x, y, produced, plabels, anchors=anchors)["anchors"]
    da = np.linalg.norm(x[anchors][:, None, :] - x[None], axis=2)
    da[np.arange(len(anchors)), anchors] = np.inf  # an anchor is not its own neighbour
    assert_no_near_tie(x[anchors], x, y, y[anchors], exclude=anchors)
    a_own = np.where(y[None] == y[anchors][:, None], da, np.inf).min(axis=1)
    a_other = np.where(y[None] != y[anchors][:, None], da, np.inf).min(axis=1)
    assert base["n"] == len(anchors)
    # own < other is decided on the same float32 numbers on both sides: exactly equal fractions
    assert base["fraction_own_closer"] == pytest.approx(float((a_own < a_other).mean()))
    # same float32 distances; the ratio and median differ only in float32 vs float64 division
    assert base["median_ratio"] == pytest.approx(float(np.median(a_own / a_other)), rel=1e-5)
    # copies of the anchors, their own anchor left out: exactly as honest as the anchors
    copies = produced_honesty(x, y, x[anchors], y[anchors], produced_from=anchors, anchors=anchors)
    np.testing.assert_allclose(copies["own_distance"], a_own, rtol=1e-5)
    np.testing.assert_allclose(copies["other_distance"], a_other, rtol=1e-5)
    assert copies["fraction_own_closer"] == copies["anchors"]["fraction_own_closer"]
    # without produced_from, a copy sits on its anchor: own distance 0
    assert produced_honesty(x, y, x[anchors], y[anchors])["own_distance"].max() == 0.0


def test_what_if_das_state_uses_the_same_das_settings_as_training() -> None:
    """The app's what-if DAS (compute_das_state with cfg.das_kwargs()) and the trainer's DAS
    (losses.build_das) come from one mapping: every recipe option reaches both (the what-if
    state once missed the asymmetric scale range and the authors' bank overflow)."""
    from das_core.training.config import TrainConfig
    from das_core.training.das import DenselyAnchoredSampling
    from das_core.training.losses import build_das

    cfg = TrainConfig(das=True, das_gamma_low=0.5, das_gamma_high=2.0, das_bank_overflow="authors",
                      das_mode="mts", das_topk=8, das_detach=False)
    trained = build_das(cfg, 7)
    assert trained is not None
    what_if = DenselyAnchoredSampling(7, cfg.embedding_dim, **cfg.das_kwargs())
    assert what_if.config() == trained.config()
    assert what_if.config()["gamma_range"] == (0.5, 2.0) and what_if.config()["bank_overflow"] == "authors"


def test_produce_for_anchors_layout_seed_and_state() -> None:
    """What the Explore page draws: T rounds of the chosen anchors, row t·A + i from anchor i,
    the same points for the same seed, and DAS's state untouched."""
    from das_core.explorer.analysis import produce_for_anchors

    gen = np.random.default_rng(0)
    emb = gen.normal(size=(40, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.repeat(np.arange(4), 10)
    das = DenselyAnchoredSampling(4, 8, bank_size=4, r_s=0.2, r_b=0.5)
    das.update(torch.from_numpy(emb), torch.from_numpy(labels))
    before = {k: v.clone() for k, v in das.state_dict().items()}
    anchors = np.array([3, 17, 25])
    kw = {"r_s": 0.2, "r_b": 0.5, "rounds": 2, "topk": 3, "use_dfs": True, "use_mts": True}
    out, lab, anc, rnd = produce_for_anchors(das, emb, labels, anchors, seed=5, **kw)
    assert out.shape == (6, 8) and out.dtype == np.float32
    assert lab.tolist() == [0, 1, 2] * 2 and anc.tolist() == [3, 17, 25] * 2 and rnd.tolist() == [1, 1, 1, 2, 2, 2]
    again = produce_for_anchors(das, emb, labels, anchors, seed=5, **kw)[0]
    assert np.array_equal(out, again)  # same seed, same draws: bit-identical
    assert not np.array_equal(out, produce_for_anchors(das, emb, labels, anchors, seed=6, **kw)[0])
    assert all(torch.equal(v, before[k]) for k, v in das.state_dict().items())
    empty = produce_for_anchors(None, emb, labels, anchors, seed=5, **kw)
    assert empty[0].shape == (0, 8) and all(len(e) == 0 for e in empty[1:])
