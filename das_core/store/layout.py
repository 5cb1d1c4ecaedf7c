"""The one place that names the files of a run folder.

A run folder (``runs/<name>/``, or any ``--out``) holds::

    config.yaml              the resolved config (written first; ``--resume`` reads it)
    metrics.jsonl            one JSON line per epoch (and per measured step)
    progress.json            the live state (epoch, step, loss, eta, ...), rewritten atomically
    last.safetensors         the checkpoint of the last finished epoch
    best.safetensors         the checkpoint of the epoch selected on validation
    train_state.safetensors  optimizer and scaler state, for an exact ``--resume``
    summary.json             written when training ends
    timeline.npz             embeddings of a fixed test subset after every epoch (--timeline-probe)
    tensorboard/             TensorBoard event files (--tensorboard)
    job.json, train.log, cancel, .job.lock   a background job's state, output, stop request, lock

Training, the job queue, the run lists, the reports, the demo builder and the checkpoint
loader all go through ``RunLayout``; none spells a file name itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
PROGRESS = "progress.json"
SUMMARY = "summary.json"
LAST = "last.safetensors"
BEST = "best.safetensors"
TRAIN_STATE = "train_state.safetensors"
JOB = "job.json"
LOG = "train.log"
CANCEL = "cancel"
JOB_LOCK = ".job.lock"
TIMELINE = "timeline.npz"
TENSORBOARD = "tensorboard"

# The checkpoints a run folder offers, in the order a reader prefers them: the epoch selected
# on validation, else the last one.
CHECKPOINTS = (BEST, LAST)
# Files training writes with das_core.store.io.atomic_write: a kill leaves ``.<name>.<random>.tmp``.
ATOMIC = (LAST, BEST, TRAIN_STATE, METRICS, PROGRESS, SUMMARY, CONFIG, TIMELINE)
DEMO_METRICS_SUFFIX = ".metrics.jsonl"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder's files (nothing is read or created)."""

    run_dir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))

    @property
    def config(self) -> Path:
        return self.run_dir / CONFIG

    @property
    def history(self) -> Path:
        """``metrics.jsonl``: the per-epoch records."""
        return self.run_dir / METRICS

    @property
    def progress(self) -> Path:
        return self.run_dir / PROGRESS

    @property
    def summary(self) -> Path:
        return self.run_dir / SUMMARY

    @property
    def last(self) -> Path:
        return self.run_dir / LAST

    @property
    def best(self) -> Path:
        return self.run_dir / BEST

    @property
    def train_state(self) -> Path:
        return self.run_dir / TRAIN_STATE

    @property
    def job(self) -> Path:
        return self.run_dir / JOB

    @property
    def log(self) -> Path:
        return self.run_dir / LOG

    @property
    def cancel(self) -> Path:
        return self.run_dir / CANCEL

    @property
    def job_lock(self) -> Path:
        return self.run_dir / JOB_LOCK

    @property
    def timeline(self) -> Path:
        return self.run_dir / TIMELINE

    @property
    def tensorboard(self) -> Path:
        return self.run_dir / TENSORBOARD

    @property
    def checkpoint(self) -> Path | None:
        """``best.safetensors`` if it is there, else ``last.safetensors``, else ``None``."""
        return next((p for p in (self.best, self.last) if p.is_file()), None)

    def atomic_files(self) -> tuple[Path, ...]:
        """The files training writes atomically (a kill can leave a temporary beside each)."""
        return tuple(self.run_dir / name for name in ATOMIC)


def is_run_checkpoint(path: Path) -> bool:
    """Whether ``path`` is one of a run folder's checkpoints (named after its folder)."""
    return Path(path).name in CHECKPOINTS


def demo_metrics(checkpoint: Path) -> Path:
    """The ``<name>.metrics.jsonl`` kept beside an embedded demo checkpoint ``<name>.safetensors``."""
    p = Path(checkpoint)
    return p.with_name(p.stem + DEMO_METRICS_SUFFIX)
