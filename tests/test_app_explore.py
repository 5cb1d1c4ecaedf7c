"""The Explore and DAS internals pages through Streamlit's AppTest (no browser)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app_helpers import app_on, decode, install_run, no_errors, plotly_specs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_ckpt(digits_run: Path) -> Path:
    run = install_run(digits_run, Path(os.environ["DAS_RUNS_DIR"]))
    return run / "best.safetensors"


def _produced(spec: dict) -> list[tuple[float, float]]:
    pts: list[tuple[float, float]] = []
    for trace in spec["data"]:
        if str(trace.get("name", "")).startswith("produced"):
            pts += list(zip(decode(trace["x"]), decode(trace["y"]), strict=True))
    return pts


def test_explore_renders_and_sliders_re_produce(run_ckpt: Path) -> None:
    at = app_on("app/pages/explore.py", run_ckpt)
    no_errors(at)
    maps = [s for s in plotly_specs(at) if any(t.get("name", "").startswith("produced") for t in s["data"])]
    assert maps, "the map shows produced points"
    before = _produced(maps[0])
    # default: 50 anchors per class x T rounds on the training split (5 digit classes)
    assert len(before) == 5 * 50 * at.sidebar.number_input(key="T").value
    assert maps[0]["layout"]["meta"]["thumbs"]["count"] > 0  # hover thumbnails wired
    metric_labels = [m.label for m in at.metric]
    assert "Gap fill" in metric_labels and "Produced nearer their own class" in metric_labels

    at.sidebar.slider(key="r_s").set_value(0.5).run()
    no_errors(at)
    after = _produced([s for s in plotly_specs(at) if any(t.get("name", "").startswith("produced") for t in s["data"])][0])
    assert len(after) == len(before)
    assert after != before, "moving r_s re-produces the points"

    at.sidebar.toggle(key="dfs").set_value(False).run()
    at.sidebar.toggle(key="mts").set_value(False).run()
    no_errors(at)
    assert not any(_produced(s) for s in plotly_specs(at))
    assert any("nothing to produce" in i.value.lower() for i in at.info)


def test_explore_test_split_uses_a_computed_das_state(run_ckpt: Path) -> None:
    at = app_on("app/pages/explore.py", run_ckpt)
    at.sidebar.radio(key="split").set_value("test").run()
    no_errors(at)
    assert any("never trained on" in c.value for c in at.caption)


def test_das_internals_shows_the_trained_state(run_ckpt: Path) -> None:
    at = app_on("app/pages/das_internals.py", run_ckpt)
    no_errors(at)
    assert any("trained with DAS" in s.value for s in at.success)
    specs = plotly_specs(at)
    heat = [s for s in specs if s["data"] and s["data"][0]["type"] == "heatmap"]
    assert heat, "the frequency heatmap is drawn"
    assert any(t.get("name", "").startswith("mask") for t in heat[0]["data"])


def test_a_deleted_checkpoint_is_a_message_not_a_traceback(run_ckpt: Path, tmp_path: Path) -> None:
    import shutil

    copy = install_run(run_ckpt.parent, Path(os.environ["DAS_RUNS_DIR"]), name="soon-deleted")
    at = app_on("app/pages/explore.py", copy / "best.safetensors")
    no_errors(at)
    shutil.rmtree(copy)
    at.run()
    assert not at.exception
    assert any("gone" in w.value for w in at.sidebar.warning)


def test_selected_points_customdata_in_every_form_the_browser_sends() -> None:
    """A box selection's points carry customdata as a list, a scalar, or (binary-sent numpy
    rows) an object keyed "0", "1", ...: all read the same; a point without any is skipped."""
    from app.plots import point_customdata

    assert point_customdata({"customdata": {"1": 3, "0": 316}}) == [316, 3]
    assert point_customdata({"customdata": {"0": 12}}) == [12]
    assert point_customdata({"customdata": [7]}) == [7]
    assert point_customdata({"customdata": 5}) == [5]
    assert point_customdata({"x": 1.0}) is None
