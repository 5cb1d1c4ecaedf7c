"""The training timeline as maps: the probe images of a run (``das_core.store.timeline``) mapped
at each stored epoch, each map aligned to the one before, so that played in order the points
move only as much as the embedding space changed.

Each epoch's probe embeddings get their own UMAP fit (``fit_map``: the space changes, so one
fit cannot place another epoch's points), then an orthogonal Procrustes fit
(``compare.align_to``: rotation or reflection, uniform scale, translation) onto the previous
epoch's aligned map, chained from the first. Two runs that probed the same images
(``comparable``) are put in one frame of reference by ``align_runs``: one transform for all of
the second run's epochs, fitted on the last epochs of both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from das_core.explorer.compare import align_to
from das_core.explorer.umap_fit import MapParams, fit_map
from das_core.store.cache import CacheMiss, DiskCache, array_checksum
from das_core.store.io import atomic_write
from das_core.store.timeline import Timeline, TimelineError

DEFAULT_MAX_FRAMES = 30


@dataclass
class TimelineMaps:
    """Aligned maps of a run's probe images: ``coords[i]`` is the map after epoch ``epochs[i]``."""

    epochs: np.ndarray  # (F,) int64
    coords: np.ndarray  # (F, n, 2) float32
    labels: np.ndarray  # (n,) int64
    indices: np.ndarray  # (n,) int64, rows of the split
    class_names: list[str]
    method: str

    def __len__(self) -> int:
        return int(self.epochs.shape[0])


def frame_rows(n_epochs: int, max_frames: int = DEFAULT_MAX_FRAMES) -> np.ndarray:
    """Which of ``n_epochs`` stored epochs become frames: all of them, or ``max_frames`` evenly
    spaced ones that always include the first and the last."""
    if max_frames < 2:
        raise ValueError(f"max_frames must be >= 2, got {max_frames}")
    if n_epochs <= max_frames:
        return np.arange(n_epochs, dtype=np.int64)
    return np.unique(np.linspace(0, n_epochs - 1, max_frames).round().astype(np.int64))


def align_chain(frames: list[np.ndarray]) -> np.ndarray:
    """``frames`` (each ``(n, 2)``, the same points in the same order) with each one aligned
    (Procrustes) onto the previous one once that is aligned; the first is kept as it is."""
    out: list[np.ndarray] = []
    for xy in frames:
        out.append(np.asarray(xy, dtype=np.float32) if not out else align_to(out[-1], xy))
    return np.stack(out) if out else np.zeros((0, 0, 2), np.float32)


def timeline_maps(
    timeline: Timeline,
    *,
    seed: int = 0,
    params: MapParams = MapParams(),
    max_frames: int = DEFAULT_MAX_FRAMES,
    progress: Callable[[float, str], None] | None = None,
) -> TimelineMaps:
    """The aligned maps of ``timeline``'s probe images at (up to ``max_frames`` of) its epochs."""
    if len(timeline) == 0:
        raise ValueError("the timeline holds no epoch yet")
    rows = frame_rows(len(timeline), max_frames)
    maps: list[np.ndarray] = []
    for i, row in enumerate(rows):
        if progress is not None:
            progress(i / len(rows), f"map of epoch {int(timeline.epochs[row])} ({i + 1} of {len(rows)})")
        emb = timeline.embeddings[row].astype(np.float32)
        maps.append(fit_map(emb, labels=timeline.labels, seed=seed, params=params).coords)
    if progress is not None:
        progress(1.0, "maps aligned")
    n = timeline.indices.shape[0]
    return TimelineMaps(
        epochs=timeline.epochs[rows].astype(np.int64),
        coords=align_chain(maps),
        labels=timeline.labels.copy(),
        indices=timeline.indices.copy(),
        class_names=timeline.class_names,
        method=(
            f"one UMAP map of the {n:,} probe images per epoch (seed {seed}), each aligned onto the previous "
            "epoch's by orthogonal Procrustes (rotation or reflection, uniform scale, translation)"
        ),
    )


def comparable(a: Timeline, b: Timeline) -> str | None:
    """Why two runs' timelines cannot be played side by side point by point, or ``None``."""
    da, db = a.meta.get("dataset"), b.meta.get("dataset")
    if da != db:
        return f"they probe different datasets ({da} and {db})"
    if a.meta.get("split_size") != b.meta.get("split_size") or not np.array_equal(a.indices, b.indices):
        return "they probe different images (the test splits differ: other class split or data)"
    if not np.array_equal(a.labels, b.labels):
        return "their probe images have different labels"
    return None


def align_runs(reference: TimelineMaps, other: TimelineMaps) -> TimelineMaps:
    """``other`` with every frame moved by the one transform that puts its last map onto the
    last map of ``reference`` (both probe the same images: see ``comparable``), so that the two
    runs end in the same frame of reference and each keeps its own motion."""
    if not np.array_equal(reference.indices, other.indices):
        raise ValueError("the two timelines probe different images")
    f, n = other.coords.shape[:2]
    stacked = other.coords.reshape(f * n, 2)
    rows = np.arange(n) + (f - 1) * n  # the last frame's rows in the stack
    moved = align_to(reference.coords[-1], stacked, pairs=(np.arange(n), rows)).reshape(f, n, 2)
    return TimelineMaps(other.epochs, moved, other.labels, other.indices, other.class_names,
                        other.method + "; then moved as a whole onto the other run's last map")


def frame_schedule(*epoch_lists: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Common frames for runs with different stored epochs: the union of their epochs, and
    for each run the row of its latest map at or before each of them (its first map before
    its first epoch), so that a run with fewer epochs holds its last map."""
    if not epoch_lists or any(len(e) == 0 for e in epoch_lists):
        raise ValueError("every run needs at least one stored epoch")
    union = np.unique(np.concatenate([np.asarray(e, dtype=np.int64) for e in epoch_lists]))
    rows = [np.clip(np.searchsorted(np.asarray(e), union, side="right") - 1, 0, None) for e in epoch_lists]
    return union, rows


def thumbnail_ids(timeline: Timeline, split_size: int) -> np.ndarray:
    """The probe's indices in its split, as the run stored them, for hover thumbnails cut out
    of the sprites of that split (``split_size`` items: ``explorer.thumbs`` numbers an item by
    its index in the split). ``TimelineError`` when that split is not the one the run probed
    (another size, so other images), rather than thumbnails of the wrong images."""
    split = timeline.meta.get("split", "test")
    stored = timeline.meta.get("split_size")
    if stored is not None and int(stored) != int(split_size):
        raise TimelineError(
            f"the run probed a {split} split of {int(stored):,} images, but the thumbnails cover one of "
            f"{int(split_size):,}: the dataset changed since the run (re-render or re-download it as it was, "
            "or train the run again)"
        )
    if timeline.indices.size and (int(timeline.indices.min()) < 0 or int(timeline.indices.max()) >= split_size):
        raise TimelineError(
            f"the run's probe indices reach {int(timeline.indices.max())}, outside the {split} split of "
            f"{int(split_size):,} images: its timeline.npz is damaged (train the run again)"
        )
    return timeline.indices.astype(np.int64, copy=True)


def timeline_runs(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """The rows of ``runs_view.runs_table`` whose run folder (a run's or a sweep trial's)
    holds a training timeline."""
    from das_core.store.timeline import timeline_path

    return [r for r in rows if r.get("kind") in ("run", "sweep trial") and timeline_path(str(r["path"])).is_file()]


# -- the disk cache ---------------------------------------------------------------------------

MAPS_FORMAT = 1


def _read_maps(path: Path) -> TimelineMaps:
    if not path.is_file():
        raise CacheMiss("no timeline maps file")
    with np.load(path, allow_pickle=False) as z:
        return TimelineMaps(
            epochs=z["epochs"].astype(np.int64),
            coords=z["coords"].astype(np.float32),
            labels=z["labels"].astype(np.int64),
            indices=z["indices"].astype(np.int64),
            class_names=[str(c) for c in json.loads(str(z["class_names"]))],
            method=str(z["method"]),
        )


def _write_maps(path: Path, maps: TimelineMaps) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, epochs=maps.epochs, coords=maps.coords, labels=maps.labels, indices=maps.indices,
                     class_names=np.array(json.dumps(maps.class_names)), method=np.array(maps.method))

    atomic_write(path, write)


TIMELINE_MAPS: DiskCache[TimelineMaps] = DiskCache(
    "timeline-maps", MAPS_FORMAT, read=_read_maps, write=_write_maps, name="timeline-maps", suffix=".npz",
    lock=".timeline-maps.lock",
)


def get_timeline_maps(
    run_dir: str | Path,
    *,
    seed: int = 0,
    params: MapParams = MapParams(),
    max_frames: int = DEFAULT_MAX_FRAMES,
    progress: Callable[[float, str], None] | None = None,
    root: Path | None = None,
) -> TimelineMaps:
    """``timeline_maps`` of the run in ``run_dir``, read from the disk cache when that run's
    timeline (its epochs and embeddings, by checksum) was mapped with the same settings, else
    computed and saved. Entries live under ``cache_root()/timeline-<run>/test/``."""
    from das_core.explorer.umap_fit import library_versions
    from das_core.store.timeline import load_timeline

    t = load_timeline(run_dir)
    run_key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    key = {
        "seed": int(seed),
        "params": params.as_dict(),
        "max_frames": int(max_frames),
        "versions": library_versions(),
        "epochs": t.epochs.tolist(),
        "embeddings": array_checksum(t.embeddings),
        "indices": array_checksum(t.indices),
        "labels": array_checksum(t.labels),
    }
    return TIMELINE_MAPS.get(
        f"timeline-{run_key}",
        str(t.meta.get("split", "test")),
        lambda: timeline_maps(t, seed=seed, params=params, max_frames=max_frames, progress=progress),
        key,
        root=root,
        accept=lambda m: np.array_equal(m.indices, t.indices),
    )
