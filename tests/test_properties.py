"""Property tests (hypothesis): DAS under random shapes, label patterns and dtypes; the metrics
with singleton classes, ties and duplicate embeddings; the config loader on random documents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from das_core.retrieval.evaluation import evaluate_embeddings
from das_core.training.config import ConfigError, TrainConfig, load_config_file
from das_core.training.das import DenselyAnchoredSampling

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])


@FAST
@given(
    b=st.integers(0, 24),
    d=st.integers(1, 12),
    c=st.integers(1, 8),
    pattern=st.sampled_from(["single-sample classes", "one class", "all classes", "random"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 10_000),
)
def test_das_any_shape_pattern_and_dtype(b: int, d: int, c: int, pattern: str, dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    if pattern == "single-sample classes":
        c = max(c, b)
        labels = torch.randperm(c, generator=g)[:b]
    elif pattern == "one class":
        labels = torch.full((b,), seed % c)
    elif pattern == "all classes":
        labels = torch.arange(b) % c
    else:
        labels = torch.randint(0, c, (b,), generator=g)
    topk = 1 + seed % d
    das = DenselyAnchoredSampling(c, d, topk=topk, num_produce=2, bank_size=3, r_s=0.3, r_b=0.5)
    x = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).to(dtype)
    out, lab = das(x, labels)
    assert out.dtype == dtype and out.shape == (3 * b, d) and torch.equal(lab, labels.repeat(3))
    assert torch.isfinite(out.float()).all()
    if b:
        norms = out[b:].float().norm(dim=1)
        # normalised in float32, then cast: float16 / bfloat16 move each entry by <= 2^-11 / 2^-9
        # relatively, so the norm is within 2e-3 of 1 (float32 alone: ~1e-6)
        assert torch.allclose(norms, torch.ones_like(norms), atol=2e-2)
    # state: counts are whole numbers that add up; banks only hold classes that had >= 2 samples
    assert das.frequency.sum().item() == b * topk
    counts = torch.bincount(labels, minlength=c)
    assert torch.all(das.bank_filled[counts < 2] == 0)
    assert torch.all(das.bank_filled <= 3)


@st.composite
def labelled_points(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(2, 60))
    d = draw(st.integers(1, 6))
    n_classes = draw(st.integers(1, max(1, n)))
    labels = np.array(draw(st.lists(st.integers(0, n_classes - 1), min_size=n, max_size=n)), dtype=np.int64)
    # few distinct values: many ties and exact duplicates
    values = draw(st.lists(st.integers(-2, 2), min_size=n * d, max_size=n * d))
    return np.array(values, dtype=np.float32).reshape(n, d), labels


@FAST
@given(st.data())
def test_metrics_stay_in_range_with_ties_duplicates_and_singletons(data: st.DataObject) -> None:
    x, y = data.draw(labelled_points())
    m = evaluate_embeddings(x, y)
    for k, v in m.items():
        assert 0.0 <= v <= 1.0 and np.isfinite(v), (k, v)
    assert m["R@1"] <= m["R@2"] <= m["R@4"] <= m["R@8"]
    # renaming the classes changes nothing
    perm = np.random.default_rng(0).permutation(int(y.max()) + 1)
    m2 = evaluate_embeddings(x, perm[y])
    for k in ("R@1", "R@2", "R@4", "R@8", "MAP@R", "RP"):  # integer points: exact distances, same
        assert m2[k] == pytest.approx(m[k], abs=1e-9), k  # rankings; float64 sums: ~1e-14 apart


def test_metrics_duplicates_of_every_item_give_perfect_recall() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(20, 8)).astype(np.float32)
    x = np.concatenate([base, base])  # every item has an exact twin of its class
    y = np.concatenate([np.arange(20), np.arange(20)])
    m = evaluate_embeddings(x, y)
    assert m["R@1"] == 1.0 and m["MAP@R"] == 1.0 and m["RP"] == 1.0


_keys = st.sampled_from([*TrainConfig.field_names(), "das", "optim", "pddm", "bogus", "r_s", "lr", "data"])
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=12))
_docs = st.recursive(
    _scalars | st.dictionaries(_keys, _scalars, max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=6),
    max_leaves=20,
)


@FAST
@given(doc=_docs)
def test_config_loader_accepts_or_refuses_cleanly(doc: object, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = Path(tmp_path_factory.mktemp("cfg")) / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        cfg = TrainConfig.from_mapping(load_config_file(path))
    except ConfigError as exc:
        assert exc.field and str(exc)  # names the field and what is allowed
    else:
        cfg.validate()  # whatever loads is valid
