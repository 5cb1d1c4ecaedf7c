"""Checkpoints uploaded through the app: stored only inside the app's upload folder, under a
sanitised name, validated before they are kept; and run folders read only under the runs root."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from das_core.store.checkpoint import CheckpointError, load_checkpoint
from das_core.store.io import atomic_write_bytes

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


def _keep_if_valid(data: bytes, staging: Path, target: Path, check: Callable[[Path], object],
                   error: type[Exception], shown: str) -> Path:
    """Write ``data`` to ``staging``, ``check`` it there and only then move it to ``target``.
    An ``error`` from ``check`` is raised again naming ``shown`` (the uploaded file's safe name)
    instead of the staging file; whatever happens, no staging file is left behind."""
    try:
        atomic_write_bytes(staging, data)
        try:
            check(staging)
        except error as exc:
            message = str(exc).replace(str(staging), shown).replace(staging.name, shown)
            raise error(message) from exc
        staging.replace(target)
    finally:
        staging.unlink(missing_ok=True)
    return target


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
    return _keep_if_valid(data, staging, target, load_checkpoint, CheckpointError, safe_name(filename))


def list_uploads(upload_dir: Path) -> list[Path]:
    if not upload_dir.is_dir():
        return []
    files = [p for p in upload_dir.glob("*.safetensors") if not p.name.startswith(".")]
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name), reverse=True)  # ties: by name


def store_embeddings_upload(upload_dir: Path, filename: str, data: bytes) -> Path:
    """Keep an uploaded embeddings file (``.npz`` / ``.parquet``) in ``upload_dir`` when it reads
    as one (``das_core.store.external``); otherwise raise ``EmbeddingsFileError``, keep nothing."""
    from das_core.store.external import MAX_FILE_BYTES, SUFFIXES, EmbeddingsFileError, read_embeddings_file

    suffix = Path(safe_name(filename)).suffix.lower()
    if suffix not in SUFFIXES:
        raise EmbeddingsFileError(f"{filename}: an embeddings file is a .npz or a .parquet file")
    if len(data) > MAX_FILE_BYTES:
        raise EmbeddingsFileError(f"{filename}: {len(data) / 1e6:.0f} MB is over the {MAX_FILE_BYTES // 10**6} MB limit")
    upload_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()[:10]
    target = upload_dir / f"{digest}-{safe_name(filename)}"
    staging = upload_dir / f".incoming-{digest}{suffix}"
    return _keep_if_valid(data, staging, target, read_embeddings_file, EmbeddingsFileError, safe_name(filename))


def list_embeddings_uploads(upload_dir: Path) -> list[Path]:
    """The embeddings files uploaded so far, newest first."""
    from das_core.store.external import SUFFIXES

    if not upload_dir.is_dir():
        return []
    files = [p for p in upload_dir.iterdir() if p.suffix.lower() in SUFFIXES and not p.name.startswith(".")]
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
