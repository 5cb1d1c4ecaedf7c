"""The Explore and DAS internals pages through Streamlit's AppTest (no browser)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from app_helpers import app_on, decode, install_run, no_errors, plotly_specs, produced_layers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_ckpt(digits_run: Path) -> Path:
    run = install_run(digits_run, Path(os.environ["DAS_RUNS_DIR"]))
    return run / "best.safetensors"


def _explore_map(at: AppTest) -> dict:
    (spec,) = [s for s in plotly_specs(at) if any(t.get("meta", "").startswith("produced-") for t in s["data"])]
    return spec


def _produced(at: AppTest) -> dict[str, dict]:
    """The produced points the page sends for the Explore map, by the meta of their trace."""
    from app.produced_layer import decode_payload

    (layer,) = produced_layers(at)
    assert layer["target"] == "explore_map"
    return decode_payload(layer)


def test_explore_renders_and_sliders_re_produce(run_ckpt: Path) -> None:
    at = app_on("app/pages/explore.py", run_ckpt)
    no_errors(at)
    spec = _explore_map(at)
    slots = {t["meta"]: t for t in spec["data"] if t.get("meta", "").startswith("produced-")}
    before = _produced(at)
    # one produced trace per class (the 5 digit classes of the training split) and the links;
    # the session's first draw carries the points the component sends too (the browser then
    # draws the map once), exactly: float32 positions, anchor ids and rounds
    assert set(slots) == set(before) | {"produced-links"} and len(before) == 5
    assert all(t["name"].startswith("produced") for u, t in slots.items() if u != "produced-links")
    for u, p in before.items():
        assert slots[u]["x"]["dtype"] == slots[u]["y"]["dtype"] == "f4", u  # sent as float32, not rounded
        xy = np.stack([decode(slots[u]["x"]), decode(slots[u]["y"])], axis=1)
        assert (xy == p["xy"]).all(), u
        cd = np.asarray(decode(slots[u]["customdata"])).reshape(-1, 2)
        assert (cd[:, 0] == p["anchor"]).all() and (cd[:, 1] == p["round"]).all(), u
    n_links = sum(len(p["anchor"]) for p in before.values())
    assert len(decode(slots["produced-links"]["x"])) == 3 * n_links  # anchor, produced point, gap
    # default: 50 anchors per class x T rounds on the training split (5 digit classes)
    rounds = at.sidebar.number_input(key="T").value
    assert sum(len(p["anchor"]) for p in before.values()) == 5 * 50 * rounds
    assert all(len(p["xy"]) == len(p["round"]) == len(p["anchor"]) for p in before.values())
    assert {int(r) for p in before.values() for r in p["round"]} == set(range(1, rounds + 1))  # rounds count from 1
    assert spec["layout"]["meta"]["thumbs"]["count"] > 0  # hover thumbnails wired
    # the sliders' ranges are the table's (das_core.training.ranges), as the config's and the module's
    from das_core.training.ranges import R_B, R_S, T

    for key, r in (("r_s", R_S), ("r_b", R_B)):
        slider = at.sidebar.slider(key=key)
        assert (slider.min, slider.max, slider.step) == (r.ui_low, r.ui_high, r.ui_step), key
    assert (at.sidebar.number_input(key="T").min, at.sidebar.number_input(key="T").max) == (T.ui_low, T.ui_high)
    metric_labels = [m.label for m in at.metric]
    assert "Gap fill" in metric_labels and "Produced nearer their own class" in metric_labels

    at.sidebar.slider(key="r_s").set_value(0.5).run()
    no_errors(at)
    after = _produced(at)
    assert _explore_map(at) == spec, "a slider move leaves the figure (and so what is sent for it) unchanged"
    assert {u: len(p["anchor"]) for u, p in after.items()} == {u: len(p["anchor"]) for u, p in before.items()}
    assert any((after[u]["xy"] != before[u]["xy"]).any() for u in before), "moving r_s re-produces the points"
    for u in before:  # the same anchors
        assert (after[u]["anchor"] == before[u]["anchor"]).all()

    at.sidebar.toggle(key="dfs").set_value(False).run()
    at.sidebar.toggle(key="mts").set_value(False).run()
    no_errors(at)
    assert not any(len(p["anchor"]) for p in _produced(at).values())
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
    from das_core.training.ranges import R_B

    rb = at.slider(key="internals_rb")
    assert (rb.min, rb.max, rb.step) == (R_B.ui_low, R_B.ui_high, R_B.ui_step)


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
