"""The Compare page through AppTest: the runs table with the digits run's metrics, its curves,
the benchmark section, and two checkpoints' maps (aligned, what moved; refused across datasets)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from app_helpers import digits_runs_root, fake_checkpoint, make_sweep
from das_core.explorer import bench_view, runs_view

REPO = Path(__file__).resolve().parent.parent
PAGE = "app/pages/compare.py"


@pytest.fixture
def runs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_run: Path) -> Path:
    return digits_runs_root(tmp_path, monkeypatch, digits_run)


def frame(at: AppTest, column: str) -> Any:
    """The (first) dataframe on the page with ``column``."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def page(**state: Any) -> AppTest:
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=120)
    for key, value in state.items():
        at.session_state[key] = value
    return at.switch_page(PAGE)


def test_runs_table_lists_the_digits_run_with_its_metrics(runs_root: Path, digits_run: Path) -> None:
    ckpt = str(runs_root / "digits" / "best.safetensors")
    at = page(compare_ckpt_a=ckpt, compare_ckpt_b=ckpt).run()
    assert not at.exception and not at.error
    table = frame(at, "name")
    row = table[table["name"] == "digits"].iloc[0]
    summary = json.loads((digits_run / "summary.json").read_text())
    for m in runs_view.METRICS:  # the same float64 numbers, read back from JSON (exact round trip)
        assert row[m] == pytest.approx(summary["last"]["test"][m])
        assert row[f"sel. {m}"] == pytest.approx(summary["selected"]["test"][m])
    assert bool(row["DAS"]) and row["dataset"] == "digits" and row["loss"] == "triplet" and row["seed"] == 3
    assert row["epochs"] == 2 and row["selected epoch"] == summary["selected_epoch"]
    assert "digits" in at.multiselect(key="compare_runs").value
    # R@1 and loss per epoch, and the DAS diagnostics (the run trained with DAS)
    assert [c.key for c in at.get("plotly_chart")] == ["compare_r1", "compare_loss", "compare_diag_chart"]
    options = at.selectbox(key="compare_diag").options
    assert runs_view.DIAGNOSTIC_LABELS["das_diagnostics.share_own_copy"] in options
    assert runs_view.DIAGNOSTIC_LABELS["weight_norm.backbone"] in options
    # shown first: the gradient ratio (what explains DAS's effect in the fine-grained benchmark)
    assert at.selectbox(key="compare_diag").value == "das_diagnostics.grad_ratio"
    logged = runs_view.run_diagnostics(digits_run)
    assert len(logged["das_diagnostics.share_own_copy"]) == 2  # one value per epoch
    bench = bench_view.bench_summary(REPO / "bench" / "results")
    shown = sum(d is not None for d in (bench["das"], bench["step"]))
    assert sum(("variant" in d.value.columns) or ("plain step (ms)" in d.value.columns) for d in at.dataframe) == shown
    assert len(bench["missing"]) == sum("bench" in i.value for i in at.info)


def test_runs_table_shows_a_sweep_trial_with_its_swept_values(runs_root: Path, digits_run: Path) -> None:
    make_sweep(runs_root, digits_run)
    ckpt = str(runs_root / "digits" / "best.safetensors")
    at = page(compare_ckpt_a=ckpt, compare_ckpt_b=ckpt).run()
    assert not at.exception and not at.error
    table = frame(at, "name")
    row = table[table["name"] == "rs-sweep/trial-0000"].iloc[0]
    assert row["kind"] == "sweep trial" and row["params"] == "r_s=0.01, r_b=0.05"
    summary = json.loads((digits_run / "summary.json").read_text())
    assert row["R@1"] == pytest.approx(summary["last"]["test"]["R@1"])  # exact JSON round trip
    assert list(table[table["kind"] == "sweep trial"]["name"]) == ["rs-sweep/trial-0000", "rs-sweep/trial-0001"]
    # and its curve can be plotted beside the run's
    runs = at.multiselect(key="compare_runs")
    assert "rs-sweep/trial-0000 (DAS, r_s=0.01, r_b=0.05)" in runs.options  # the label shows the swept values
    runs.set_value(["digits", "rs-sweep/trial-0000"]).run()
    assert not at.exception and not at.error
    r1 = next(c for c in at.get("plotly_chart") if c.key == "compare_r1")
    traces = [t["name"] for t in json.loads(r1.proto.spec)["data"]]  # type: ignore[attr-defined]
    assert "rs-sweep/trial-0000 · test" in traces and "digits · test" in traces


def test_two_maps_aligned_and_other_datasets_refused(runs_root: Path, digits_run: Path) -> None:
    shutil.copytree(digits_run, runs_root / "digits-copy")
    a = str(runs_root / "digits" / "best.safetensors")
    b = str(runs_root / "digits-copy" / "best.safetensors")
    other = str(fake_checkpoint(Path(a), runs_root / "fashion" / "best.safetensors", dataset="fashion-mnist"))
    at = page(compare_ckpt_a=a, compare_ckpt_b=other).run()
    assert not at.exception and not at.error
    assert any("different datasets" in w.value for w in at.warning)
    at.selectbox(key="compare_ckpt_b").set_value(b).run()
    assert not at.exception and not at.error and not at.warning
    at.toggle(key="compare_draw").set_value(True).run()
    assert not at.exception and not at.error
    moved = frame(at, "rank")
    assert len(moved) == 20 and list(moved["rank"]) == list(range(1, 21))
    assert set(moved["class"]) <= {str(c) for c in range(5, 10)}
    # the two curves, the DAS diagnostics (the digits run logs them) and the two maps
    assert [c.key for c in at.get("plotly_chart")] == [
        "compare_r1", "compare_loss", "compare_diag_chart", "compare_map_a", "compare_map_b"
    ]
