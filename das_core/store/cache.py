"""The explorer's disk cache: everything derived from a checkpoint (embeddings, maps, retrieval
indexes, thumbnail sheets) is kept on disk, keyed by the checkpoint's identity (its content,
``Checkpoint.identity``), the split and the parameters, so that reopening a map is instant.

``DiskCache`` is the one read-through cache every kind of entry goes through (embeddings here,
maps in ``das_core.explorer.maps``, indexes in ``das_core.retrieval.index``, sprite sheets in
``das_core.explorer.thumbs``): an entry lives at ``cache_root()/<identity>/<split>/<name>``
(``<name>-<parameter digest><suffix>`` when its parameters key it too); ``get`` reads it, else
computes it once under a file lock (concurrent app sessions and processes wait for one
computation, then read it) and writes it atomically.
An entry that is missing, partial, stale, corrupt or of another format version is recomputed,
never an error. Deleting the folder is always safe.

Embeddings (``get_embeddings``): ``<identity>/<split>/`` holds ``embeddings.npy``,
``labels.npy`` and ``meta.json`` (written last, atomically: it is the entry's commit marker
and records the format, the arrays' shapes and checksums).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from das_core.store.io import atomic_write, atomic_write_json, file_lock
from das_core.store.io import file_key as file_key  # re-exported: the content hash behind identities

if TYPE_CHECKING:
    from das_core.data.base import DatasetSplits
    from das_core.store.checkpoint import Checkpoint

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_DIGEST_CHARS = 16
T = TypeVar("T")


def cache_root() -> Path:
    """``$DAS_CACHE_DIR``, else ``<repository>/.cache/explorer``."""
    env = os.environ.get("DAS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / ".cache" / "explorer"


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
        return len(self.embeddings)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def entry_dir(checkpoint_key: str, split: str, root: Path | None = None) -> Path:
    """The cache folder of one checkpoint on one split (under ``root``, default ``cache_root()``)."""
    if not checkpoint_key or any(c in checkpoint_key + split for c in "/\\") or split in ("", ".", ".."):
        raise ValueError(f"invalid cache entry name {checkpoint_key!r}/{split!r}")
    return (cache_root() if root is None else Path(root)) / checkpoint_key / split


def params_digest(params: Mapping[str, Any]) -> str:
    """16 hex characters of the SHA-256 of ``params`` as canonical JSON."""
    return hashlib.sha256(json.dumps(dict(params), sort_keys=True).encode()).hexdigest()[:_DIGEST_CHARS]


class CacheMiss(Exception):
    """Raised by a ``DiskCache`` reader: the entry is absent or stale (computed, quietly)."""


# What a reader may raise on a partial or corrupt entry (recomputed, with a warning).
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, EOFError)


@dataclass(frozen=True)
class DiskCache(Generic[T]):
    """A read-through disk cache of one kind of entry, keyed by (checkpoint identity, split,
    parameters).

    ``read(path)`` returns the entry at ``path`` or raises: ``CacheMiss`` when it is absent or
    stale, anything in ``OSError, ValueError, KeyError, TypeError, EOFError`` when it is partial
    or corrupt (logged); it also refuses an entry of another format ``version``. ``write(path,
    value)`` stores a computed value atomically. ``name`` is the entry's file or folder inside
    the ``<identity>/<split>/`` folder ("" is that folder itself); with parameters the name
    gets their digest (which covers ``version``) and ``suffix``. ``lock`` is the lock file's
    name beside the entry (inside it, for a folder entry). ``keep_unsaved``: a failed write
    is logged and the computed value still returned (else it raises)."""

    kind: str
    version: int
    read: Callable[[Path], T]
    write: Callable[[Path, T], None]
    name: str = ""
    suffix: str = ""
    lock: str = ".lock"
    keep_unsaved: bool = False

    def path(
        self, identity: str, split: str, params: Mapping[str, Any] | None = None, *, root: Path | None = None
    ) -> Path:
        """Where the entry of ``identity`` on ``split`` with ``params`` lives."""
        folder = entry_dir(identity, split, root)
        if params is not None:
            digest = params_digest({"format": self.version, **params})
            return folder / f"{self.name or self.kind}-{digest}{self.suffix}"
        return folder / self.name if self.name else folder

    def _lock_path(self, path: Path) -> Path:
        return path.parent / self.lock if self.name or self.suffix else path / self.lock

    def load(self, path: Path, accept: Callable[[T], bool] | None = None) -> T | None:
        """The entry at ``path``, or ``None`` when it is absent, partial, corrupt, or stale
        (``accept(entry)`` false: e.g. built from other arrays)."""
        try:
            value = self.read(path)
        except CacheMiss as exc:
            log.debug("no usable %s in %s (%s)", self.kind, path, exc)
            return None
        except _UNREADABLE as exc:
            log.warning("cache entry %s is unreadable (%s): recomputing", path, exc)
            return None
        if accept is not None and not accept(value):
            log.info("the %s in %s is stale: recomputing", self.kind, path)
            return None
        return value

    def peek(
        self, identity: str, split: str, params: Mapping[str, Any] | None = None, *, root: Path | None = None
    ) -> T | None:
        """The cached entry, or ``None`` (nothing is computed)."""
        return self.load(self.path(identity, split, params, root=root))

    def get(
        self,
        identity: str,
        split: str,
        compute: Callable[[], T],
        params: Mapping[str, Any] | None = None,
        *,
        root: Path | None = None,
        accept: Callable[[T], bool] | None = None,
    ) -> T:
        """The cached entry, else ``compute()``'s value, written for the next caller."""
        return self.get_at(self.path(identity, split, params, root=root), compute, accept=accept)

    def get_at(self, path: Path, compute: Callable[[], T], *, accept: Callable[[T], bool] | None = None) -> T:
        """``get`` for an entry whose place the caller chose (e.g. an index folder)."""
        hit = self.load(path, accept)
        if hit is not None:
            return hit
        with file_lock(self._lock_path(path)):
            hit = self.load(path, accept)  # another session may have just written it
            if hit is not None:
                return hit
            value = compute()
            try:
                self.write(path, value)
            except OSError as exc:
                if not self.keep_unsaved:
                    raise
                log.warning("could not save the %s to %s: %s", self.kind, path, exc)
            return value


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)

    atomic_write(path, write)


def _read_embeddings(folder: Path) -> EmbeddingSet:
    """The set cached in ``folder`` (``<identity>/<split>/``)."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise CacheMiss("no meta.json")
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
    if array_checksum(emb) != meta["embeddings_checksum"] or array_checksum(labels) != meta["labels_checksum"]:
        raise ValueError("checksum mismatch")
    return EmbeddingSet(
        embeddings=emb,
        labels=labels,
        class_names=[str(c) for c in meta["class_names"]],
        split=folder.name,
        dataset=str(meta.get("dataset", "")),
        checkpoint_key=folder.parent.name,
        meta=meta,
    )


def _write_embeddings(folder: Path, es: EmbeddingSet) -> None:
    """Arrays first, ``meta.json`` last (its extra fields from ``es.meta``), all atomic."""
    emb = np.ascontiguousarray(es.embeddings, dtype=np.float32)
    labels = np.ascontiguousarray(es.labels, dtype=np.int64)
    _save_npy(folder / "embeddings.npy", emb)
    _save_npy(folder / "labels.npy", labels)
    meta = {
        **es.meta,
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


EMBEDDINGS: DiskCache[EmbeddingSet] = DiskCache(
    "embeddings", CACHE_FORMAT, read=_read_embeddings, write=_write_embeddings
)


def save_embedding_set(es: EmbeddingSet, extra_meta: dict[str, Any] | None = None) -> Path:
    """Write ``es`` into its cache folder (arrays first, ``meta.json`` last, all atomic)."""
    folder = EMBEDDINGS.path(es.checkpoint_key, es.split)
    es.meta = dict(extra_meta or {})
    _write_embeddings(folder, es)
    return folder


def load_cached_embeddings(checkpoint_key: str, split: str) -> EmbeddingSet | None:
    """The cached embeddings of a checkpoint on a split, or ``None`` (nothing is computed)."""
    return EMBEDDINGS.peek(checkpoint_key, split)


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
    key = ckpt.identity

    def compute() -> EmbeddingSet:
        from das_core.models.embed import embed_dataset
        from das_core.runtime import resolve_device

        dev = resolve_device(device)
        nonlocal splits
        if splits is None:
            from das_core.training.loop import load_splits_for

            splits = load_splits_for(ckpt.config, data_root)
        dataset = splits.get(split)
        model = ckpt.build_model(dev)
        emb, labels = embed_dataset(
            model, dataset, batch_size=int(ckpt.config.eval_batch_size), device=dev, progress=progress
        )
        return EmbeddingSet(
            embeddings=np.ascontiguousarray(emb, dtype=np.float32),
            labels=np.ascontiguousarray(labels, dtype=np.int64),
            class_names=list(dataset.class_names),
            split=split,
            dataset=ckpt.dataset,
            checkpoint_key=key,
            meta={"checkpoint": str(ckpt.path), "device": str(dev)},
        )

    return EMBEDDINGS.get(key, split, compute)
