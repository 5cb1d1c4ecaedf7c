"""The last resort: an exception nobody expected becomes one short line for the user and a
log file holding the traceback (for the bug report), never a wall of traceback on screen.

Every input a user can hand us (files, flags, uploads) is refused earlier with a message of
its own; the tests check that none of them reaches this handler.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path

from das_core.messages import clip


def log_dir() -> Path:
    """``$DAS_LOG_DIR``, else ``.logs/`` in the runs root."""
    env = os.environ.get("DAS_LOG_DIR")
    if env:
        return Path(env).expanduser()
    from das_core.store.runs import default_runs_root

    return default_runs_root() / ".logs"


def record_crash(exc: BaseException, where: str) -> Path:
    """Write ``exc``'s traceback to a new file in ``log_dir()`` (or the temp folder when that
    cannot be written) and return its path."""
    text = f"DAS Explorer: unexpected error in {where}\n" + "".join(
        traceback.format_exception(type(exc), exc, exc.__traceback__)
    )
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**6}.log"
    for folder in (log_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return Path(os.devnull)  # pragma: no cover - neither folder writable


LAST_RESORT = "unexpected error"


def last_resort_message(exc: BaseException, where: str) -> str:
    """One short line: what failed, and where the traceback was written."""
    path = record_crash(exc, where)
    return (
        f"{LAST_RESORT} in {where} ({type(exc).__name__}: {clip(str(exc), 100)[1:-1]}). This is a bug in DAS "
        f"Explorer; the traceback is in {path}"
    )
