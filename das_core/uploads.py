"""Checkpoints uploaded through the app: stored only inside the app's upload folder, under a
sanitised name, validated before they are kept; and run folders read only under the runs root."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from das_core.checkpoint import CheckpointError, load_checkpoint
from das_core.io import atomic_write_bytes

MAX_CHECKPOINT_BYTES = 512 * 1024 * 1024
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(filename: str) -> str:
    """A file name that cannot leave its folder: the last path component of ``filename``
    (either slash), characters outside ``[A-Za-z0-9._-]`` replaced, no leading dots."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = _SAFE.sub("_", base).lstrip(".") or "checkpoint"
    return base[:120]


def within(root: Path, path: Path) -> bool:
    """Whether ``path`` resolves to ``root`` or below it (symlinks followed)."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def store_checkpoint_upload(upload_dir: Path, filename: str, data: bytes) -> Path:
    """Keep an uploaded checkpoint in ``upload_dir`` (and nowhere else) when it is a valid DAS
    Explorer checkpoint; otherwise raise ``CheckpointError`` and keep nothing."""
    if not filename.lower().endswith(".safetensors"):
        raise CheckpointError(
            f"{filename}: only .safetensors checkpoints can be uploaded (pickled .pt/.pth files can run "
            "code and are refused; convert them with `python -m das_core` in a trusted environment)"
        )
    if len(data) > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{filename}: {len(data) / 1e6:.0f} MB is over the {MAX_CHECKPOINT_BYTES // 10**6} MB limit")
    upload_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()[:10]
    name = safe_name(filename)
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    target = upload_dir / f"{digest}-{name}"
    if not within(upload_dir, target):  # pragma: no cover - safe_name already prevents it
        raise CheckpointError(f"{filename}: refused: the name points outside the upload folder")
    staging = upload_dir / f".incoming-{digest}.safetensors"
    try:
        atomic_write_bytes(staging, data)
        try:
            load_checkpoint(staging)
        except CheckpointError as exc:
            raise CheckpointError(str(exc).replace(str(staging), safe_name(filename))) from exc
        staging.replace(target)
    finally:  # whatever happens, no staging file is left behind
        staging.unlink(missing_ok=True)
    return target


def list_uploads(upload_dir: Path) -> list[Path]:
    if not upload_dir.is_dir():
        return []
    files = [p for p in upload_dir.glob("*.safetensors") if not p.name.startswith(".")]
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name), reverse=True)  # ties: by name
