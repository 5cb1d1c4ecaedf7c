"""The pages on a checkpoint of 520 training classes (an image folder with two styles per
class): classes found by name, no legend entry per class, per-class DAS state by name, and
the style of every retrieval hit. Through Streamlit's AppTest (no browser)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from app_helpers import app_on, install_run, no_errors, plotly_specs
from conftest import MANY_NAMES, MANY_STYLES, MANY_TRAIN, MANY_ZEBRA

pytestmark = pytest.mark.slow

N_TRAIN = MANY_TRAIN
STYLES = MANY_STYLES
NAMES = MANY_NAMES
ZEBRA = MANY_ZEBRA


@pytest.fixture(scope="module")
def many_ckpt(many_class_run: Path) -> Path:
    run = install_run(many_class_run, Path(os.environ["DAS_RUNS_DIR"]), name="many-classes")
    return run / "last.safetensors"


def legend_entries(spec: dict[str, Any]) -> list[str]:
    return [t.get("name", "") for t in spec["data"] if t.get("showlegend", True) is not False]


def the_map(at: Any, key: str) -> dict[str, Any]:
    specs = [s for s in plotly_specs(at) if any(str(t.get("name", "")).startswith("all ") for t in s["data"])]
    assert specs, f"no many-class map on the page ({key})"
    return specs[0]


def test_explore_finds_a_class_by_name_and_keeps_the_legend_short(many_ckpt: Path) -> None:
    at = app_on("app/pages/explore.py", many_ckpt)
    no_errors(at)
    picker = at.multiselect(key="classes")
    assert len(picker.options) == N_TRAIN and ZEBRA in picker.options  # searchable by the class name
    assert 0 < len(picker.value) <= 20  # a default subset, not every class
    spec = the_map(at, "explore")
    (every,) = [t for t in spec["data"] if str(t.get("name", "")).startswith("all ")]
    assert every["name"] == f"all {N_TRAIN} classes" and every["showlegend"] is False
    assert len(every["text"]) == N_TRAIN * len(STYLES) and ZEBRA in every["text"]  # the class on hover
    assert len(set(every["marker"]["color"])) > 100  # a colour per class, not a 20-colour cycle
    assert len(legend_entries(spec)) <= 2 * 20 + 2, "no legend entry per class"

    picker.set_value([NAMES.index(ZEBRA)]).run()
    no_errors(at)
    spec = the_map(at, "explore")
    legend = legend_entries(spec)
    assert ZEBRA in legend and f"produced · {ZEBRA}" in legend
    assert not any(n.startswith("produced") and n != f"produced · {ZEBRA}" for n in legend)


def test_das_internals_shows_the_bank_of_a_class_picked_by_name(many_ckpt: Path) -> None:
    at = app_on("app/pages/das_internals.py", many_ckpt)
    no_errors(at)
    rows = at.multiselect(key="internals_rows")
    assert 0 < len(rows.value) <= 20
    (heat,) = [s for s in plotly_specs(at) if s["data"] and s["data"][0]["type"] == "heatmap"
               and len(s["data"][0].get("y", [])) == len(rows.value)]
    assert len(heat["data"][0]["y"]) < N_TRAIN  # rows of the picked classes only
    box = at.selectbox(key="internals_class")
    assert ZEBRA in box.options
    box.set_value(NAMES.index(ZEBRA)).run()
    no_errors(at)
    captions = " ".join(c.value for c in at.caption)
    # every class is sampled in an epoch, both of its images in one batch: its bank holds their difference
    assert f"of two {ZEBRA} embeddings" in captions, captions


def test_retrieval_shows_the_style_of_each_hit(many_ckpt: Path) -> None:
    at = app_on("app/pages/retrieve.py", many_ckpt)
    at.radio(key="retrieve_split").set_value("train").run()
    at.number_input(key="retrieve_index").set_value(2 * NAMES.index(ZEBRA) + 1).run()
    no_errors(at)
    (res,) = at.session_state["retrieve_results"]
    assert res["styles"] and set(res["styles"]) <= set(STYLES)
    captions = [c for el in at.get("image") for c in el.captions]
    hits = [c for c in captions if " · d " in c]
    assert len(hits) == len(res["indices"])
    for cap, style in zip(hits, res["styles"], strict=True):
        assert f" · {style} · #" in cap, cap
    assert any(f"{ZEBRA} · style twemoji" in c.value for c in at.caption)  # the query's own style
    spec = the_map(at, "retrieve")
    assert ZEBRA in legend_entries(spec) and len(legend_entries(spec)) <= 4


def test_an_emoji_checkpoint_without_the_rendered_data_says_how_to_get_it(
        digits_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app_helpers import digits_runs_root, fake_checkpoint

    root = digits_runs_root(tmp_path, monkeypatch, digits_run)
    ckpt = fake_checkpoint(digits_run / "best.safetensors", root / "emoji" / "best.safetensors",
                           dataset="emoji-styles", image_size=32)
    monkeypatch.setenv("DAS_DATA_DIR", str(tmp_path / "no-data"))  # nothing installed there
    at = app_on("app/pages/explore.py", ckpt)
    assert not at.exception
    (err,) = at.error  # the page's guard, on opening the dataset
    assert "emoji-styles is not installed here" in err.value and "make data" in err.value
    assert not (tmp_path / "no-data").exists(), "the app does not start installing behind a spinner"
