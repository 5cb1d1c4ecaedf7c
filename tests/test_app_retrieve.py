"""The Retrieve page, driven through Streamlit's AppTest on the small digits run: gallery,
sample and upload queries, bad uploads, two checkpoints side by side, and checkpoints whose
dataset cannot be loaded or differs. (AppTest 1.67 uploads files: ``file_uploader.set_value``.)"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from app_helpers import digits_runs_root, fake_checkpoint

REPO = Path(__file__).resolve().parent.parent
PAGE = "app/pages/retrieve.py"


@pytest.fixture
def runs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_run: Path) -> Path:
    return digits_runs_root(tmp_path, monkeypatch, digits_run)


def page(ckpt: Path, **state: Any) -> AppTest:
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=120)
    defaults = {"ckpt_path": str(ckpt), "retrieve_split": "test", "retrieve_k": 5, "retrieve_show_map": False,
                "retrieve_side": False}
    for key, value in {**defaults, **state}.items():
        at.session_state[key] = value
    return at.switch_page(PAGE)


def ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def gallery_labels(digits_run: Path) -> np.ndarray:
    from das_core.store.checkpoint import load_checkpoint
    from das_core.training.loop import load_splits_for

    return load_splits_for(load_checkpoint(digits_run).config).test.labels


def test_gallery_query_returns_k_marked_results(runs_root: Path) -> None:
    ckpt = runs_root / "digits" / "best.safetensors"
    at = page(ckpt, retrieve_index=17).run()
    ok(at)
    labels = gallery_labels(runs_root / "digits")
    (res,) = at.session_state["retrieve_results"]
    assert res["checkpoint"] == str(ckpt)
    assert len(res["indices"]) == 5 and 17 not in res["indices"]  # the query is left out
    assert res["distances"] == sorted(res["distances"])
    assert res["labels"] == labels[res["indices"]].tolist()
    assert res["correct"] == [lab == labels[17] for lab in res["labels"]]
    s = res["summary"]
    assert s["k"] == 5 and s["hits"] == sum(res["correct"]) and s["relevant"] == int((labels == labels[17]).sum()) - 1
    captions = " ".join(c.value for c in at.caption)
    assert "R@1" in captions and "answered in" in captions and "#17 of the test split" in captions
    # another k and another image
    at.slider(key="retrieve_k").set_value(12)
    at.number_input(key="retrieve_index").set_value(3)
    at.run()
    ok(at)
    (res,) = at.session_state["retrieve_results"]
    assert len(res["indices"]) == 12 and 3 not in res["indices"]
    at.button(key="retrieve_random").click().run()
    ok(at)
    assert 0 <= at.session_state["retrieve_index"] < len(labels)


def test_sample_query_is_marked_and_placed_on_the_map(runs_root: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample whose name says its class (``7-test<i>.png``) and where it comes from: results
    marked, its own gallery copy left out, the query placed on the map."""
    from app import state

    labels = gallery_labels(runs_root / "digits")
    i = int(np.flatnonzero(labels == 2)[4])  # test class 2 is the digit "7"
    from das_core.store.checkpoint import load_checkpoint
    from das_core.training.loop import load_splits_for

    test = load_splits_for(load_checkpoint(runs_root / "digits").config).test
    samples = tmp_path / "samples"
    samples.mkdir()
    test.load_image(i).resize((56, 56)).save(samples / f"7-test{i}.png")
    monkeypatch.setattr(state, "QUERY_SAMPLES", samples)
    at = page(runs_root / "digits" / "best.safetensors", retrieve_source="sample", retrieve_show_map=True).run()
    ok(at)
    (res,) = at.session_state["retrieve_results"]
    assert res["correct"] is not None and i not in res["indices"]
    assert res["correct"] == [lab == 2 for lab in res["labels"]] and sum(res["correct"]) >= 3
    assert len(at.get("plotly_chart")) == 1
    # the shipped Fashion-MNIST samples name no digit class: results come unmarked
    monkeypatch.setattr(state, "QUERY_SAMPLES", REPO / "assets" / "queries")
    at.run()
    ok(at)
    (res,) = at.session_state["retrieve_results"]
    assert res["correct"] is None and len(res["indices"]) == 5
    assert "not marked" in " ".join(c.value for c in at.caption)


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_uploads_good_and_bad(runs_root: Path) -> None:
    at = page(runs_root / "digits" / "best.safetensors", retrieve_source="upload").run()
    ok(at)
    assert any("Upload an image" in i.value for i in at.info)
    up = at.file_uploader(key="retrieve_upload")
    up.set_value(("notes.png", b"these bytes are not an image", "image/png")).run()
    assert not at.exception
    assert any("cannot be used as a query" in e.value and "not an image" in e.value for e in at.error)
    # truncated PNG
    good = _png(Image.new("L", (40, 30), 128))
    at.file_uploader(key="retrieve_upload").set_value(("cut.png", good[: len(good) // 2], "image/png")).run()
    assert not at.exception and any("truncated or corrupt" in e.value for e in at.error)
    # a decompression bomb / huge image: 72 MP
    bomb = _png(Image.new("L", (9000, 8000)))
    at.file_uploader(key="retrieve_upload").set_value(("huge.png", bomb, "image/png")).run()
    assert not at.exception and any("limit" in e.value for e in at.error)
    # a colour WebP with transparency, any size: prepared like a training image; class chosen -> marked
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 255, (33, 47, 4), dtype=np.uint8), "RGBA")
    at.file_uploader(key="retrieve_upload").set_value(("odd.webp", _png(rgba, "WEBP"), "image/webp"))
    at.selectbox(key="retrieve_upload_label").set_value(1)
    at.run()
    ok(at)
    (res,) = at.session_state["retrieve_results"]
    assert len(res["indices"]) == 5 and res["correct"] == [lab == 1 for lab in res["labels"]]


def test_two_checkpoints_side_by_side(runs_root: Path, digits_run: Path) -> None:
    shutil.copytree(digits_run, runs_root / "digits-copy")
    a, b = runs_root / "digits" / "best.safetensors", runs_root / "digits-copy" / "best.safetensors"
    other = fake_checkpoint(a, runs_root / "fashion" / "best.safetensors", dataset="fashion-mnist")
    at = page(a, retrieve_side=True, retrieve_ckpt_b=str(b), retrieve_index=5).run()
    ok(at)
    ra, rb = at.session_state["retrieve_results"]
    assert (ra["checkpoint"], rb["checkpoint"]) == (str(a), str(b))
    assert ra["indices"] == rb["indices"] and ra["correct"] == rb["correct"]  # the same weights
    # a second checkpoint of another dataset is refused politely
    at.selectbox(key="retrieve_ckpt_b").set_value(str(other)).run()
    ok(at)
    assert any("different datasets" in w.value for w in at.warning)
    assert len(at.session_state["retrieve_results"]) == 1


def test_checkpoint_whose_dataset_cannot_be_loaded(runs_root: Path, tmp_path: Path) -> None:
    bad = fake_checkpoint(runs_root / "digits" / "best.safetensors", runs_root / "lost" / "best.safetensors",
                          dataset="folder", data_root=str(tmp_path / "no-such-folder"))
    at = page(bad).run()
    assert not at.exception
    assert at.error and "Loading the dataset" in at.error[0].value
