"""The training timeline of a run: the embeddings of a fixed probe subset of the test images at
every epoch (epoch 0 = before training; for runs of more than 50 epochs, every k-th one and
the last: ``timeline_due``), in one file of the run folder, ``timeline.npz``.

The probe is chosen by ``probe_indices`` from the test split's size alone, with a fixed seed
(not the run's), so every run of the same dataset and split probes the same images and two
runs' timelines can be played side by side. Embeddings are stored as float16 (a map needs
no more; 2,000 probes x 128 dimensions x 2 bytes = 0.5 MB per epoch). The file is rewritten
atomically at each epoch (``append_epoch``), so a kill leaves the previous epochs intact, and
``--resume`` drops the epochs it recomputes (``keep_before``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from das_core.store import layout
from das_core.store.io import atomic_write

TIMELINE = layout.TIMELINE
PROBE_SEED = 20220725  # fixed: the probe must not depend on a run's seed
FORMAT_VERSION = 1
MAX_STORED_EPOCHS = 50  # beyond this many epochs, every k-th one is stored (and the last)


class TimelineError(ValueError):
    """A timeline file is missing, damaged or does not fit what it is combined with."""


def timeline_due(epoch: int, epochs: int, max_stored: int = MAX_STORED_EPOCHS) -> bool:
    """Whether a run of ``epochs`` epochs stores its probes after ``epoch``: every epoch up to
    ``max_stored`` epochs; beyond, every ``ceil(epochs / max_stored)``-th and the last, so a
    long run's file stays at most ``max_stored + 2`` epochs (epoch 0 included)."""
    stride = max(1, -(-epochs // max_stored))
    return epoch == 0 or epoch == epochs or epoch % stride == 0


def probe_indices(n: int, size: int) -> np.ndarray:
    """Sorted indices of ``min(size, n)`` of ``n`` items, drawn with a fixed seed: the same
    for every run whose split has ``n`` items."""
    if n < 0 or size < 0:
        raise ValueError(f"n and size must be >= 0, got n={n}, size={size}")
    if size >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(PROBE_SEED)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


@dataclass
class Timeline:
    """Probe embeddings over epochs: ``embeddings[i]`` are the probes after epoch ``epochs[i]``."""

    indices: np.ndarray  # (n,) int64 rows of the split
    labels: np.ndarray  # (n,) int64 labels of the split (its own numbering)
    epochs: np.ndarray  # (E,) int64, increasing; 0 = before training
    embeddings: np.ndarray  # (E, n, d) float16
    meta: dict[str, Any] = field(default_factory=dict)  # dataset, split, split_size, class_names

    def __post_init__(self) -> None:
        n = self.indices.shape[0]
        if self.labels.shape != (n,):
            raise TimelineError(f"labels must have shape ({n},), got {self.labels.shape}")
        if self.embeddings.ndim != 3 or self.embeddings.shape[:2] != (self.epochs.shape[0], n):
            raise TimelineError(
                f"embeddings must have shape ({self.epochs.shape[0]}, {n}, d), got {self.embeddings.shape}"
            )
        if self.epochs.size > 1 and not np.all(np.diff(self.epochs) > 0):
            raise TimelineError(f"epochs must increase, got {self.epochs.tolist()}")

    def __len__(self) -> int:
        return int(self.epochs.shape[0])

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.meta.get("class_names", [])]

    def keep_before(self, epoch: int) -> Timeline:
        """The epochs before ``epoch`` (what a run resumed at ``epoch`` keeps)."""
        keep = self.epochs < epoch
        return Timeline(self.indices, self.labels, self.epochs[keep], self.embeddings[keep], dict(self.meta))

    def with_epoch(self, epoch: int, embeddings: np.ndarray) -> Timeline:
        """This timeline with ``epoch``'s probe embeddings ``(n, d)`` appended (or replacing a
        later part: the epochs from ``epoch`` on are dropped first)."""
        emb = np.asarray(embeddings)
        base = self.keep_before(epoch)
        n = self.indices.shape[0]
        d = base.embeddings.shape[2] if len(base) else emb.shape[-1]
        if emb.shape != (n, d):
            raise TimelineError(f"epoch {epoch}: embeddings must have shape ({n}, {d}), got {emb.shape}")
        before = base.embeddings if len(base) else np.zeros((0, n, d), dtype=np.float16)
        return Timeline(
            base.indices,
            base.labels,
            np.append(base.epochs, np.int64(epoch)).astype(np.int64),
            np.concatenate([before, emb[None].astype(np.float16)]),
            base.meta,
        )

    def save(self, path: Path) -> None:
        """Write atomically (a kill leaves the old file or the new one)."""

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    indices=self.indices.astype(np.int64),
                    labels=self.labels.astype(np.int64),
                    epochs=self.epochs.astype(np.int64),
                    embeddings=self.embeddings.astype(np.float16),
                    meta=np.array(json.dumps({**self.meta, "format_version": FORMAT_VERSION})),
                )

        atomic_write(Path(path), write)

    @classmethod
    def load(cls, path: Path) -> Timeline:
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if not isinstance(meta, dict):
                    raise ValueError("its meta is not a mapping")
                return cls(
                    indices=z["indices"].astype(np.int64),
                    labels=z["labels"].astype(np.int64),
                    epochs=z["epochs"].astype(np.int64),
                    embeddings=z["embeddings"].astype(np.float16),
                    meta=meta,
                )
        except FileNotFoundError as exc:
            raise TimelineError(
                f"{path} does not exist: the run has no training timeline (trained before timelines existed, "
                "or with --timeline-probe 0)"
            ) from exc
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise TimelineError(f"{path} is damaged or not a training timeline: {exc}") from exc


def empty_timeline(
    indices: np.ndarray, labels: np.ndarray, dim: int, meta: dict[str, Any]
) -> Timeline:
    return Timeline(
        np.asarray(indices, dtype=np.int64),
        np.asarray(labels, dtype=np.int64),
        np.zeros(0, dtype=np.int64),
        np.zeros((0, len(indices), dim), dtype=np.float16),
        dict(meta),
    )


def timeline_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / TIMELINE


def load_timeline(run_dir: str | Path) -> Timeline:
    """The timeline of the run in ``run_dir`` (``TimelineError`` when it has none)."""
    return Timeline.load(timeline_path(run_dir))
