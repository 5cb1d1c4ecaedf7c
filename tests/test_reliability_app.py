"""Issue 14, defects 2 and 10 and the app's last resort: the checkpoint upload gives a clear
message for every bad file and never leaves its staging file; an uploaded checkpoint reads data
only under the allowed data roots, and the Retrieve page says why it refuses."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from app_helpers import digits_runs_root, fake_checkpoint
from das_core.data.policy import DataPolicyError, allowed_data_roots, check_data_access
from das_core.store import uploads
from das_core.store.checkpoint import CheckpointError
from das_core.training.config import TrainConfig
from tests.fixtures import make_image_folder
from tests.reliability_helpers import edited, small_checkpoint, split_file, write_with_header

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_checkpoint(tmp_path_factory.mktemp("good") / "good.safetensors")


def _bad_files(good: Path, tmp: Path) -> dict[str, bytes]:
    def meta(key: str, value: Any) -> bytes:
        return edited(good, tmp / f"{key}.safetensors", lambda h: h["__metadata__"].update({key: value})).read_bytes()

    _, body = split_file(good)
    return {
        "epoch": meta("epoch", "abc"),
        "config": meta("config", "[1, 2]"),
        "format_version": meta("format_version", "1.5"),
        "class_names": meta("class_names", "[1, 2]"),
        "offsets": edited(good, tmp / "o.safetensors",
                          lambda h: next(v for k, v in h.items() if k != "__metadata__").update(data_offsets=[0, 1e999])).read_bytes(),
        "deep": write_with_header(tmp / "deep.safetensors", b"[" * 100_000, body).read_bytes(),
        "random": os.urandom(5000),
        "empty": b"",
    }


def test_every_bad_upload_is_refused_and_no_staging_file_stays(good: Path, tmp_path: Path) -> None:
    box = tmp_path / "uploads"
    for name, data in _bad_files(good, tmp_path).items():
        with pytest.raises(CheckpointError) as err:
            uploads.store_checkpoint_upload(box, f"{name}.safetensors", data)
        assert len(str(err.value)) < 1000 and "incoming" not in str(err.value)
        assert sorted(p.name for p in box.iterdir()) == [], name
    kept = uploads.store_checkpoint_upload(box, "good.safetensors", good.read_bytes())
    assert [p.name for p in box.iterdir()] == [kept.name]


def test_staging_file_goes_even_on_an_unexpected_error(good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(path: Path) -> None:
        raise MemoryError("simulated")

    monkeypatch.setattr(uploads, "load_checkpoint", boom)
    with pytest.raises(MemoryError):
        uploads.store_checkpoint_upload(tmp_path, "x.safetensors", good.read_bytes())
    assert not list(tmp_path.glob(".incoming-*"))


def _upload_box_page() -> None:
    from app import widgets

    widgets._upload_box()


def test_upload_box_shows_a_message_for_bad_files(good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "runs"
    monkeypatch.setenv("DAS_RUNS_DIR", str(root))
    (tmp_path / "files").mkdir()
    at = AppTest.from_function(_upload_box_page, default_timeout=60).run()
    for name, data in _bad_files(good, tmp_path / "files").items():
        at.file_uploader(key="ckpt_upload").set_value((f"{name}.safetensors", data, "application/octet-stream")).run()
        assert not at.exception, name
        assert any("Upload refused" in e.value for e in at.error), name
        assert not any("unexpected error" in e.value for e in at.error), name
        assert not list((root / ".uploads").glob(".incoming-*")), name


# -- the data policy ----------------------------------------------------------------------------


def test_allow_list_from_env_file_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAS_DATA_ROOTS", raising=False)
    monkeypatch.setenv("DAS_DATA_ROOTS_FILE", str(tmp_path / "none.txt"))
    monkeypatch.setenv("DAS_DATA_DIR", str(tmp_path / "data"))
    assert allowed_data_roots() == [tmp_path / "data", Path("/usr/share/datasets")]
    (tmp_path / "roots.txt").write_text("# allowed\n/srv/images  # photos\n\n/mnt/x\n")
    monkeypatch.setenv("DAS_DATA_ROOTS_FILE", str(tmp_path / "roots.txt"))
    assert allowed_data_roots() == [Path("/srv/images"), Path("/mnt/x")]
    monkeypatch.setenv("DAS_DATA_ROOTS", f"/a{os.pathsep}/b")
    assert allowed_data_roots() == [Path("/a"), Path("/b")]


def test_uploaded_config_may_not_leave_the_data_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    allowed = tmp_path / "data"
    (allowed / "imgs").mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.mkdir()
    (allowed / "escape").symlink_to(secret)
    monkeypatch.setenv("DAS_DATA_ROOTS", str(allowed))
    cfg = TrainConfig.from_mapping({"dataset": "folder"})
    check_data_access(cfg.replace(data_root=str(allowed / "imgs")), uploaded=True)
    check_data_access(cfg.replace(data_root=str(secret)), uploaded=False)  # the operator's own run
    check_data_access(cfg, uploaded=True)  # no data_root: the dataset's standard places
    for outside in (secret, allowed / "escape", allowed / ".." / "secret", Path("/etc")):
        with pytest.raises(DataPolicyError, match="came from an upload"):
            check_data_access(cfg.replace(data_root=str(outside)), uploaded=True)


def _retrieve(ckpt: Path) -> AppTest:
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=240)
    state = {"ckpt_path": str(ckpt), "retrieve_split": "test", "retrieve_k": 3, "retrieve_show_map": False,
             "retrieve_side": False}
    for key, value in state.items():
        at.session_state[key] = value
    return at


def test_retrieve_refuses_an_uploaded_checkpoint_pointing_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_run: Path
) -> None:
    root = digits_runs_root(tmp_path, monkeypatch, digits_run)
    private = make_image_folder(tmp_path / "private", class_names=("alpha", "beta", "gamma", "delta"))
    monkeypatch.setenv("DAS_DATA_ROOTS", str(tmp_path / "data"))
    up = fake_checkpoint(root / "digits" / "best.safetensors", root / ".uploads" / "0123456789-x.safetensors",
                         dataset="folder", data_root=str(private), train_classes=2)
    at = _retrieve(up)
    at.switch_page("app/pages/retrieve.py").run()
    assert not at.exception
    errors = " ".join(e.value for e in at.error)
    assert "came from an upload" in errors and str(tmp_path / "data") in errors
    shown = json.dumps([str(getattr(n, "value", "")) for n in at.main], default=str)
    assert "alpha" not in shown and "gamma" not in shown
    # The same file as one of the operator's runs reads its folder.
    own = fake_checkpoint(up, root / "mine" / "best.safetensors", dataset="folder", data_root=str(private), train_classes=2)
    at = _retrieve(own)
    at.switch_page("app/pages/retrieve.py").run()
    assert not at.exception
    assert not any("came from an upload" in e.value for e in at.error)
