"""The explorer's disk cache: embeddings of a checkpoint on a split, keyed by the checkpoint's
content, so that reopening a map is instant.

Layout: ``cache_root()/<checkpoint key>/<split>/`` holds ``embeddings.npy``, ``labels.npy``
and ``meta.json`` (written last, atomically: it is the entry's commit marker and records
the arrays' shapes and checksum). Maps (``das_core.projection``) and other derived files go
in the same folder. An entry that is missing, partial or corrupt is recomputed, never an
error. Deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from das_core.io import atomic_write, atomic_write_json, file_lock

if TYPE_CHECKING:
    from das_core.checkpoint import Checkpoint
    from das_core.data.base import DatasetSplits

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_KEY_CHARS = 16
_key_memo: dict[tuple[str, int, int], str] = {}
_key_lock = threading.Lock()


def cache_root() -> Path:
    """``$DAS_CACHE_DIR``, else ``<repository>/.cache/explorer``."""
    env = os.environ.get("DAS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / ".cache" / "explorer"


def file_key(path: str | Path) -> str:
    """The first 16 hex characters of the SHA-256 of the file's bytes (memoised per resolved
    path, size and modification time, so a changed file gets a new key)."""
    p = Path(path).resolve()
    st = p.stat()
    memo = (str(p), st.st_size, st.st_mtime_ns)
    with _key_lock:
        hit = _key_memo.get(memo)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    key = h.hexdigest()[:_KEY_CHARS]
    with _key_lock:
        _key_memo[memo] = key
    return key


def array_checksum(arr: np.ndarray) -> str:
    """A cheap content checksum of an array (CRC-32 of its bytes, with its shape and dtype)."""
    a = np.ascontiguousarray(arr)
    crc = zlib.crc32(a.data.cast("B")) if a.size else 0
    return f"{a.dtype.str}{list(a.shape)}:{crc:08x}"


@dataclass
class EmbeddingSet:
    """Embeddings of one split under one checkpoint."""

    embeddings: np.ndarray  # (N, d) float32
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    split: str
    dataset: str
    checkpoint_key: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def entry_dir(checkpoint_key: str, split: str) -> Path:
    """The cache folder of one checkpoint on one split."""
    if not checkpoint_key or any(c in checkpoint_key + split for c in "/\\") or split in ("", ".", ".."):
        raise ValueError(f"invalid cache entry name {checkpoint_key!r}/{split!r}")
    return cache_root() / checkpoint_key / split


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)

    atomic_write(path, write)


def _read_entry(folder: Path, checkpoint_key: str, split: str) -> EmbeddingSet | None:
    """The cached set, or ``None`` when the entry is absent, partial or corrupt."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
            raise ValueError("unknown cache format")
        emb = np.load(folder / "embeddings.npy", allow_pickle=False)
        labels = np.load(folder / "labels.npy", allow_pickle=False)
        n, d = int(meta["n"]), int(meta["dim"])
        if emb.dtype != np.float32 or emb.shape != (n, d):
            raise ValueError(f"embeddings are {emb.dtype} {emb.shape}, expected float32 ({n}, {d})")
        if labels.dtype != np.int64 or labels.shape != (n,):
            raise ValueError(f"labels are {labels.dtype} {labels.shape}, expected int64 ({n},)")
        if (
            array_checksum(emb) != meta["embeddings_checksum"]
            or array_checksum(labels) != meta["labels_checksum"]
        ):
            raise ValueError("checksum mismatch")
        return EmbeddingSet(
            embeddings=emb,
            labels=labels,
            class_names=[str(c) for c in meta["class_names"]],
            split=split,
            dataset=str(meta.get("dataset", "")),
            checkpoint_key=checkpoint_key,
            meta=meta,
        )
    except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
        log.warning("cache entry %s is unreadable (%s): recomputing", folder, exc)
        return None


def save_embedding_set(es: EmbeddingSet, extra_meta: dict[str, Any] | None = None) -> Path:
    """Write ``es`` into its cache folder (arrays first, ``meta.json`` last, all atomic)."""
    folder = entry_dir(es.checkpoint_key, es.split)
    emb = np.ascontiguousarray(es.embeddings, dtype=np.float32)
    labels = np.ascontiguousarray(es.labels, dtype=np.int64)
    _save_npy(folder / "embeddings.npy", emb)
    _save_npy(folder / "labels.npy", labels)
    meta = {
        **(extra_meta or {}),
        "format": CACHE_FORMAT,
        "n": int(emb.shape[0]),
        "dim": int(emb.shape[1]),
        "class_names": list(es.class_names),
        "dataset": es.dataset,
        "split": es.split,
        "checkpoint_key": es.checkpoint_key,
        "embeddings_checksum": array_checksum(emb),
        "labels_checksum": array_checksum(labels),
    }
    atomic_write_json(folder / "meta.json", meta)
    es.meta = meta
    return folder


def load_cached_embeddings(checkpoint_key: str, split: str) -> EmbeddingSet | None:
    """The cached embeddings of a checkpoint on a split, or ``None`` (nothing is computed)."""
    return _read_entry(entry_dir(checkpoint_key, split), checkpoint_key, split)


def get_embeddings(
    ckpt: Checkpoint,
    split: str,
    *,
    data_root: str | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    splits: DatasetSplits | None = None,
) -> EmbeddingSet:
    """The embeddings of ``split`` under ``ckpt``: read from the cache, else computed with the
    checkpoint's model (``progress(done, total)`` per batch) and cached. Concurrent callers
    (app sessions) wait for one computation instead of repeating it."""
    key = file_key(ckpt.path)
    folder = entry_dir(key, split)
    cached = _read_entry(folder, key, split)
    if cached is not None:
        return cached
    with file_lock(folder / ".lock"):
        cached = _read_entry(folder, key, split)  # another session may have just written it
        if cached is not None:
            return cached
        from das_core.embed import embed_dataset, resolve_device

        dev = resolve_device(device)
        if splits is None:
            from das_core.training import load_splits_for

            splits = load_splits_for(ckpt.config, data_root)
        dataset = splits.get(split)
        model = ckpt.build_model(dev)
        emb, labels = embed_dataset(
            model, dataset, batch_size=int(ckpt.config.eval_batch_size), device=dev, progress=progress
        )
        es = EmbeddingSet(
            embeddings=np.ascontiguousarray(emb, dtype=np.float32),
            labels=np.ascontiguousarray(labels, dtype=np.int64),
            class_names=list(dataset.class_names),
            split=split,
            dataset=ckpt.dataset,
            checkpoint_key=key,
        )
        save_embedding_set(es, {"checkpoint": str(ckpt.path), "device": str(dev)})
        return es
