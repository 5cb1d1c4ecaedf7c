"""Issue 14, defect 8 and the minor `jobs cancel ../other/<id>`: job files are validated like
checkpoints; one bad job.json is listed as damaged (folder + problem) and never hides the
others; ids come from folder names; a job reference never leaves the runs root."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from das_core.store import jobs


def _job(root: Path, folder: str, **fields: Any) -> Path:
    run = root / folder
    run.mkdir(parents=True)
    data = {"id": folder, "run_dir": str(run), "device": "cpu", "state": "done", "created": time.time(),
            "config": {}, "name": folder, "returncode": 0}
    data.update(fields)
    (run / "job.json").write_text(json.dumps(data))
    return run


BAD = {
    "created-text": ({"created": "yesterday"}, "'created' must be a time"),
    "pid-text": ({"pid": "abc"}, "'pid' must be a process id"),
    "error-number": ({"error": 5}, "'error' must be text"),
    "device-list": ({"device": ["cpu"]}, "'device' must be one of cpu, cuda"),
    "device-tpu": ({"device": "tpu", "state": "queued"}, "'device' must be one of cpu, cuda"),
    "state-unknown": ({"state": "sleeping"}, "'state' must be one of"),
    "created-missing": ({"created": None}, "'created' must be a time"),
    "name-list": ({"name": ["x"]}, "'name' must be text"),
    "config-text": ({"config": "abc"}, "'config' must be a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_one_bad_job_is_damaged_and_the_others_listed(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from das_core.cli import main

    fields, expected = BAD[case]
    root = tmp_path / "runs"
    _job(root, "a-good")
    _job(root, "c-good")
    bad = _job(root, "b-bad", **fields)
    good, damaged = jobs.scan_jobs(root)
    assert sorted(j.id for j in good) == ["a-good", "c-good"]
    assert [d.run_dir for d in damaged] == [bad] and expected in damaged[0].problem
    assert str(bad / "job.json") in damaged[0].problem
    assert not (root / ".jobs" / "worker-tpu.lock").exists()  # no worker for an unknown device
    assert main(["jobs", "list", "--runs-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "a-good" in out and "c-good" in out and "b-bad" in out and "damaged" in out and expected in out
    with pytest.raises(jobs.JobError, match=expected.split()[0]):
        jobs.get_job("b-bad", root)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe", b"[" * 100_000, b'"text"'])
def test_unreadable_job_files_are_damaged(content: bytes, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    _job(root, "good")
    bad = root / "bad"
    bad.mkdir()
    (bad / "job.json").write_bytes(content)
    good, damaged = jobs.scan_jobs(root)
    assert [j.id for j in good] == ["good"] and [d.id for d in damaged] == ["bad"]


def test_a_copied_run_folder_is_another_job(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    run = _job(root, "20260101-000000-abcdef12-digits-triplet")
    shutil.copytree(run, root / "copy-of-it")
    good, _ = jobs.scan_jobs(root)
    assert sorted(j.id for j in good) == ["20260101-000000-abcdef12-digits-triplet", "copy-of-it"]


def test_cancel_never_leaves_the_runs_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from das_core.cli import main

    root = tmp_path / "runs"
    root.mkdir()
    other = _job(tmp_path / "other", "victim", state="queued")
    before = (other / "job.json").read_bytes()
    for ref in ("../other/victim", str(other), str(root / ".." / "other" / "victim"), "..", "."):
        with pytest.raises(jobs.JobError, match="not a job of the runs root"):
            jobs.cancel(ref, root)
        assert main(["jobs", "cancel", ref, "--runs-root", str(root)]) == 2
        assert "not a job of the runs root" in capsys.readouterr().err
    (root / "link").symlink_to(other)
    with pytest.raises(jobs.JobError, match="not a job of the runs root"):
        jobs.cancel("link", root)
    assert (other / "job.json").read_bytes() == before


def test_train_page_shows_damaged_and_copied_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    from tests.conftest import REPO

    root = tmp_path / "runs"
    monkeypatch.setenv("DAS_RUNS_DIR", str(root))
    run = _job(root, "first", error=None)
    shutil.copytree(run, root / "copy")
    _job(root, "broken", created="yesterday")
    _job(root, "broken2", error=5)
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60)
    at.switch_page("app/pages/train.py").run()
    assert not at.exception, at.exception
    warnings = " ".join(w.value for w in at.warning)
    assert "broken" in warnings and "'created' must be a time" in warnings and "'error' must be text" in warnings
    text = " ".join(m.value for m in at.markdown)
    assert "`first`" in text and "`copy`" in text
