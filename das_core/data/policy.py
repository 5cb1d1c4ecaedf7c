"""Which folders a checkpoint may make the app read. A checkpoint names its dataset and
``data_root``; one that came from an upload is someone else's file, so it may only read data
under the data roots the operator allows, never an arbitrary folder of the server.

The allow-list: ``$DAS_DATA_ROOTS`` (folders separated by ``:``), else the file named by
``$DAS_DATA_ROOTS_FILE`` or ``data_roots.txt`` at the repository root (one folder a line,
``#`` comments), else the defaults: the project's data folder (``$DAS_DATA_DIR`` or ``data/``)
and the folder the system's dataset packages install into (``/usr/share/datasets``).
"""

from __future__ import annotations

import os
from pathlib import Path

from das_core.training.config import TrainConfig
from das_core.data.base import DatasetError, default_data_dir
from das_core.store.runs import REPO_ROOT

ENV = "DAS_DATA_ROOTS"
FILE_ENV = "DAS_DATA_ROOTS_FILE"
DEFAULT_FILE = REPO_ROOT / "data_roots.txt"
SYSTEM_DATASETS = Path("/usr/share/datasets")


class DataPolicyError(DatasetError):
    """A checkpoint asks for data outside the folders it may read."""


def allowed_data_roots() -> list[Path]:
    """The folders an uploaded checkpoint may read data from (see the module docstring)."""
    env = os.environ.get(ENV)
    if env is not None and env.strip():
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]
    file = Path(os.environ.get(FILE_ENV) or DEFAULT_FILE)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    listed = [Path(s).expanduser() for s in (line.split("#", 1)[0].strip() for line in lines) if s]
    return listed or [default_data_dir(), SYSTEM_DATASETS]


def _within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError, RuntimeError):
        return False
    return True


def check_data_access(config: TrainConfig, *, uploaded: bool) -> None:
    """Raise ``DataPolicyError`` when an uploaded checkpoint's ``data_root`` lies outside the
    allowed data roots (symlinks followed). A checkpoint without ``data_root`` reads the
    dataset's standard places, and local checkpoints (demos, runs) are the operator's own."""
    if not uploaded or config.data_root is None:
        return
    roots = allowed_data_roots()
    if any(_within(Path(config.data_root).expanduser(), root) for root in roots):
        return
    shown = config.data_root if len(config.data_root) <= 200 else config.data_root[:200] + "..."
    raise DataPolicyError(
        f"refused: this checkpoint came from an upload and asks to read data from {shown}, outside the data "
        f"folders this server allows ({', '.join(str(r) for r in roots)}). An uploaded checkpoint may only "
        f"read data there; the operator can add a folder with ${ENV} or {DEFAULT_FILE.name}"
    )
