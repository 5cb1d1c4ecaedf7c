"""Issue 14, defects 5 and 6: --resume on a damaged or changed run folder is a clear error that
changes nothing; a kill inside epoch 1's checkpoint window leaves no duplicate epoch line and no
stray temporary file after --resume."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from das_core.store.io import read_jsonl
from tests.conftest import QUICK_DIGITS
from tests.reliability_helpers import cli_refuses, edited

QUICK = [*QUICK_DIGITS, "--steps-per-epoch", "3", "--eval-batch-size", "512"]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from das_core.cli import main

    out = tmp_path_factory.mktemp("resume") / "run"
    assert main(["train", *QUICK, "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(template: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(template, out)
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _resume_refused(capsys: pytest.CaptureFixture[str], run: Path, expected: str, *flags: str) -> None:
    before = _snapshot(run)
    cli_refuses(capsys, ["train", "--resume", "--out", str(run), "--epochs", "2", "--no-progress", *flags], expected)
    assert _snapshot(run) == before  # nothing saved is lost or changed


def test_resume_with_a_changed_model_flag(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _resume_refused(capsys, run, "does not fit the model", "--embedding-dim", "64")


def test_resume_with_an_edited_config_yaml(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("embedding_dim: 32", "embedding_dim: 48"))
    _resume_refused(capsys, run, "does not fit the model")


def test_resume_with_an_invalid_config_yaml(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("embedding_dim: 32", "embedding_dim: many"))
    _resume_refused(capsys, run, "config.yaml is not a valid config")


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:100])


def _random(p: Path) -> None:
    p.write_bytes(os.urandom(4096))


def _no_metadata(p: Path) -> None:
    edited(p, p, lambda h: h.pop("__metadata__"))


def _foreign_key(p: Path) -> None:
    def edit(h: dict[str, Any]) -> None:
        key = next(k for k in h if k != "__metadata__")
        h["weird"] = h.pop(key)

    edited(p, p, edit)


def _info(value: str) -> Callable[[Path], None]:
    return lambda p: edited(p, p, lambda h: h["__metadata__"].update(info=value))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (_truncate, "is damaged or not this run's"),
        (_random, "is damaged or not this run's"),
        (_no_metadata, "is damaged or not this run's"),
        (_foreign_key, "is damaged or not this run's"),
        (_info('{"epoch": "abc"}'), "is damaged or not this run's"),
        (_info("[1]"), "is damaged or not this run's"),
        (_info('{"epoch": 7}'), "from epoch 7 but last.safetensors from epoch 1"),
    ],
    ids=["truncated", "random", "no-metadata", "foreign-key", "info-epoch-abc", "info-list", "epoch-mismatch"],
)
def test_resume_with_a_damaged_train_state(
    damage: Callable[[Path], None], expected: str, run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damage(run / "train_state.safetensors")
    _resume_refused(capsys, run, expected)


@pytest.mark.parametrize("epoch", ['"abc"', "null", "1.5", "-1"])
def test_resume_with_a_bad_metrics_line(epoch: str, run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(f'{{"epoch": {epoch}, "train_loss": 1.0}}\n')
    _resume_refused(capsys, run, "line 2 of")


def test_kill_in_the_first_checkpoint_window_then_resume(template: Path, tmp_path: Path) -> None:
    """The files a SIGKILL leaves between epoch 1's metrics line and its train state: the line,
    no checkpoint yet, a half-written temporary file. --resume gives one epoch-1 line, no .tmp."""
    from das_core.cli import main

    out = tmp_path / "killed"
    out.mkdir()
    shutil.copy(template / "config.yaml", out / "config.yaml")
    shutil.copy(template / "metrics.jsonl", out / "metrics.jsonl")
    (out / ".last.safetensors.k3j9x2.tmp").write_bytes(b"half a checkpoint")
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert json.loads((out / "summary.json").read_text())["last_epoch"] == 1
