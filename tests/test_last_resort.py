"""The last-resort handler: an unexpected exception is one short line plus the path of a log
file holding its traceback, in the CLI and on a page. (The reliability tests check that no bad
input reaches it: each is answered with its own message.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from das_core import cli
from das_core.crashlog import LAST_RESORT
from das_core.store import jobs


def _log_path(text: str) -> Path:
    found = re.search(r"the traceback is in (\S+\.log)", text)
    assert found, text
    return Path(found.group(1))


def test_cli_bug_is_one_line_and_a_log_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DAS_LOG_DIR", str(tmp_path / "logs"))

    def bug(args: object) -> int:
        raise KeyError("secret-internal-state")

    monkeypatch.setitem(cli.COMMANDS, "presets", bug)
    assert cli.main(["presets"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and LAST_RESORT in err
    log = _log_path(err)
    assert log.parent == tmp_path / "logs"
    assert "Traceback" in log.read_text() and "secret-internal-state" in log.read_text()


def test_page_bug_is_one_message_and_a_log_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    from tests.conftest import REPO

    monkeypatch.setenv("DAS_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("DAS_LOG_DIR", str(tmp_path / "logs"))

    def bug(*args: object, **kwargs: object) -> object:
        raise ZeroDivisionError("internal")

    monkeypatch.setattr(jobs, "scan_jobs", bug)
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60)
    at.switch_page("app/pages/train.py").run()
    assert not at.exception
    message = next(e.value for e in at.error if LAST_RESORT in e.value)
    assert "ZeroDivisionError" in message and "Traceback" in _log_path(message).read_text()
