"""Run folders: where training writes, and how the app and the CLI find finished runs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from das_core.store.io import read_jsonl
from das_core.store.layout import RunLayout

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_runs_root() -> Path:
    """``$DAS_RUNS_DIR``, else ``runs/`` at the repository root."""
    env = os.environ.get("DAS_RUNS_DIR")
    return Path(env).expanduser() if env else REPO_ROOT / "runs"


@dataclass
class RunInfo:
    path: Path
    checkpoint: Path | None
    history: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.path.name


def read_run(run_dir: Path) -> RunInfo | None:
    """One run folder's checkpoint and metrics; ``None`` when it holds neither yet. The one
    reader of a run folder for every list of runs (run folders, sweep trials)."""
    run = RunLayout(Path(run_dir))
    ckpt = run.checkpoint
    hist = read_jsonl(run.history)
    return RunInfo(Path(run_dir), ckpt, hist) if ckpt is not None or hist else None


def list_runs(root: Path | None = None) -> list[RunInfo]:
    """Run folders under ``root`` (newest first) with a checkpoint or metrics in them."""
    root = root or default_runs_root()
    if not root.is_dir():
        return []
    out: list[RunInfo] = []
    for d in root.iterdir():
        if not d.is_dir() or d.name.startswith("."):
            continue
        info = read_run(d)
        if info is not None:
            out.append(info)
    # newest first; runs with the same modification time (coarse file-system clocks, folders
    # copied in one go) by name, not in the file system's directory order
    out.sort(key=lambda r: (r.path.stat().st_mtime, r.path.name), reverse=True)
    return out
