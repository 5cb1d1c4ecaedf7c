"""The run-folder layout: one module names a run's files, and every reader goes through it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO
from das_core.store import layout
from das_core.store.checkpoint import CheckpointError, resolve_checkpoint_path
from das_core.store.layout import RunLayout, demo_metrics, is_run_checkpoint


def test_paths_and_preferred_checkpoint(tmp_path: Path) -> None:
    run = RunLayout(tmp_path)
    assert run.history == tmp_path / "metrics.jsonl" and run.config == tmp_path / "config.yaml"
    assert run.last.name == "last.safetensors" and run.best.name == "best.safetensors"
    assert run.checkpoint is None
    run.last.write_bytes(b"x")
    assert run.checkpoint == run.last == resolve_checkpoint_path(tmp_path)
    run.best.write_bytes(b"x")
    assert run.checkpoint == run.best == resolve_checkpoint_path(tmp_path)  # selected on validation first
    assert is_run_checkpoint(run.best) and not is_run_checkpoint(tmp_path / "model.safetensors")
    assert {p.name for p in run.atomic_files()} >= {"last.safetensors", "progress.json", "summary.json"}
    assert demo_metrics(Path("assets/demo/x-das.safetensors")) == Path("assets/demo/x-das.metrics.jsonl")


def test_empty_run_folder_names_what_it_expected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="expected best.safetensors or last.safetensors"):
        resolve_checkpoint_path(tmp_path)


def test_no_other_module_spells_a_run_file_name() -> None:
    names = [layout.CONFIG, layout.METRICS, layout.PROGRESS, layout.SUMMARY, layout.LAST, layout.BEST,
             layout.TRAIN_STATE, layout.JOB, layout.LOG, layout.JOB_LOCK, layout.TIMELINE]
    quoted = re.compile("|".join(f"[\"']{re.escape(n)}[\"']" for n in names))
    offenders = []
    for path in sorted((REPO / "das_core").rglob("*.py")) + sorted((REPO / "app").rglob("*.py")):
        if path == REPO / "das_core" / "store" / "layout.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if quoted.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == [], "use das_core.store.layout instead:\n" + "\n".join(offenders)
