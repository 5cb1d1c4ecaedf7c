"""Bring your own embeddings in the app (AppTest, no browser): a .npz opened by path or uploaded
becomes a source next to the checkpoints; Explore (with DAS what-if and the download buttons),
Retrieve (query by item) and DAS internals work on it; a bad file gets its message."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from app_helpers import decode, no_errors, plotly_specs, produced_layers
from conftest import REPO

pytestmark = pytest.mark.slow


def _npz(path: Path, classes: int = 4, per: int = 30, d: int = 16) -> Path:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, d)) * 3
    y = np.repeat(np.arange(classes), per)
    emb = (centres[y] + rng.normal(size=(len(y), d))).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, embeddings=emb, labels=np.array(["ant", "bee", "cow", "dog"])[y])
    return path


@pytest.fixture
def byo_file() -> Path:
    # inside the runs root: a folder the app may read files from
    return _npz(Path(os.environ["DAS_RUNS_DIR"]) / "byo" / "mine.npz")


def _open(page: str, path: Path) -> AppTest:
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=240)
    at.switch_page(page)
    at.run()
    at.sidebar.text_input(key="byo_path").set_value(str(path)).run()  # typing enables Open
    return at.sidebar.button(key="byo_open").click().run()


def _produced(at: AppTest) -> list[float]:
    """The x of every produced point: in a figure, or (Explore's map) sent on their own (the map's
    produced traces, ``meta`` ``produced-…``, hold the session's first points, which the layer
    sends again: the layer's are the current ones)."""
    from app.produced_layer import decode_payload

    out: list[float] = []
    for spec in plotly_specs(at):
        for trace in spec["data"]:
            if str(trace.get("name", "")).startswith("produced") and not str(trace.get("meta", "")).startswith("produced-"):
                out += decode(trace["x"])
    for layer in produced_layers(at):
        out += [float(x) for slot in decode_payload(layer).values() for x in slot["xy"][:, 0]]
    return out


def test_explore_opens_an_npz_with_a_das_what_if_and_downloads(byo_file: Path) -> None:
    at = _open("app/pages/explore.py", byo_file)
    no_errors(at)
    assert at.session_state["ckpt_path"] == str(byo_file.resolve())
    assert any("embeddings file mine.npz" in c.value and "120 items" in c.value for c in at.caption)
    assert any("An embeddings file holds no DAS state" in c.value for c in at.caption)
    before = _produced(at)
    assert len(before) == 4 * 30 * at.sidebar.number_input(key="T").value  # 30 < 50 anchors: all of each class
    at.sidebar.slider(key="r_s").set_value(0.5).run()
    no_errors(at)
    assert _produced(at) != before, "the sliders re-produce from the file's DAS state"
    labels = [b.proto.label for b in at.get("download_button")]  # type: ignore[attr-defined]
    assert any("Parquet" in lab for lab in labels) and any("TensorBoard" in lab for lab in labels)


def test_the_download_is_what_is_shown() -> None:
    """The callable behind the Parquet button, run as the button runs it."""
    from das_core.explorer.export import export_table, parquet_bytes
    from das_core.store.external import read_embeddings_file

    path = _npz(Path(os.environ["DAS_RUNS_DIR"]) / "byo2" / "x.npz")
    es = read_embeddings_file(path).embedding_set()
    ids = np.flatnonzero(es.labels != 2)
    coords = np.zeros((len(es), 2), np.float32)
    df = pd.read_parquet(io.BytesIO(parquet_bytes(export_table(es, coords=coords, ids=ids))))
    assert df["image_id"].tolist() == ids.tolist() and "cow" not in set(df["class_name"])


def test_retrieve_and_internals_on_the_file(byo_file: Path) -> None:
    at = _open("app/pages/retrieve.py", byo_file)
    no_errors(at)
    assert [o for o in at.radio(key="retrieve_source").options] == ["an item of the file"]
    assert any("names no model checkpoint" in c.value for c in at.caption)
    assert any("R@1" in c.value for c in at.caption), "a query by item is answered"
    at = _open("app/pages/das_internals.py", byo_file)
    no_errors(at)
    assert any("holds no DAS state" in i.value for i in at.info)
    assert plotly_specs(at), "the frequency recorder and banks are drawn"


def test_a_bad_file_names_the_problem(tmp_path: Path) -> None:
    bad = Path(os.environ["DAS_RUNS_DIR"]) / "byo-bad" / "bad.npz"
    bad.parent.mkdir(parents=True, exist_ok=True)
    np.savez(bad, embeddings=np.ones((5, 3)), labels=np.zeros(4, int))
    at = _open("app/pages/explore.py", bad)
    assert any("5 embeddings but 4 labels" in e.value for e in at.error)
    outside = _npz(tmp_path / "elsewhere.npz")
    at.sidebar.text_input(key="byo_path").set_value(str(outside)).run()
    at.sidebar.button(key="byo_open").click().run()
    assert any("outside the folders this app may read" in e.value for e in at.error)


def test_upload_an_npz(tmp_path: Path) -> None:
    data = _npz(tmp_path / "up.npz").read_bytes()
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=240)
    at.switch_page("app/pages/explore.py")
    at.run()
    at.sidebar.file_uploader(key="byo_upload").set_value(("up.npz", data, "application/octet-stream"))
    at.run()
    no_errors(at)
    assert at.session_state["ckpt_path"].endswith("-up.npz")
    assert any("embeddings file" in c.value and "120 items" in c.value for c in at.caption)


def test_retrieve_by_image_when_the_file_names_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_run: Path
) -> None:
    from PIL import Image

    from app_helpers import digits_runs_root
    from das_core.cli import main

    root = digits_runs_root(tmp_path, monkeypatch, digits_run)
    assert main(["export", str(root / "digits"), "--split", "test", "--format", "parquet",
                 "--out", str(root / "byo-export"), "--das-anchors", "0"]) == 0
    at = _open("app/pages/retrieve.py", root / "byo-export" / "embeddings.parquet")
    no_errors(at)
    assert "an upload" in at.radio(key="retrieve_source").options  # the file names its model
    at.radio(key="retrieve_source").set_value("upload").run()
    buf = io.BytesIO()
    Image.new("L", (8, 8), 200).save(buf, "PNG")
    at.file_uploader(key="retrieve_upload").set_value(("q.png", buf.getvalue(), "image/png"))
    at.selectbox(key="retrieve_upload_label").set_value(1)
    at.run()
    no_errors(at)
    (res,) = at.session_state["retrieve_results"]
    assert len(res["indices"]) == at.sidebar.slider(key="retrieve_k").value
    assert res["correct"] == [lab == 1 for lab in res["labels"]]
