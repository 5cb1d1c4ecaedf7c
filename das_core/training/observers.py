"""What a run writes beside its metrics, epoch by epoch (rank 0 only): TensorBoard event files
(``--tensorboard``) and the training timeline (``--timeline-probe``).

An observer is told when the epochs start (``start``), after each epoch's record is final
(``epoch``) and when training ends (``close``). Observers only read the model; they draw no
random numbers that training uses (each epoch re-seeds), so a run's metrics are the same with
or without them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from das_core.store import layout

if TYPE_CHECKING:
    from das_core.data import DMLDataset
    from das_core.store.timeline import Timeline
    from das_core.training.loop import Trainer

log = logging.getLogger("das_core.train")

TENSORBOARD_DIR = layout.TENSORBOARD


class EpochObserver(Protocol):
    def start(self, trainer: Trainer, start_epoch: int) -> None: ...

    def epoch(self, trainer: Trainer, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def observers_for(trainer: Trainer) -> list[EpochObserver]:
    """The observers ``trainer``'s config asks for."""
    cfg = trainer.cfg
    out: list[EpochObserver] = []
    if cfg.tensorboard:
        out.append(TensorBoardLog(trainer.out / TENSORBOARD_DIR))
    if cfg.timeline_probe > 0:
        out.append(TimelineRecorder(trainer.out, cfg.timeline_probe))
    return out


# -- TensorBoard ------------------------------------------------------------------------------


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl record as TensorBoard tags: nested mappings joined with
    ``/`` (``val/R@1``, ``das_diagnostics/grad_ratio``, ``das_state/bank_fill``); the epoch is
    the step, not a scalar; non-numbers and non-finite numbers are left out."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}/{key}" if prefix else str(key), inner)
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[prefix] = float(value)

    walk("", {k: v for k, v in record.items() if k != "epoch"})
    return out


class TensorBoardLog:
    """Per-epoch scalars as event files in ``<run>/tensorboard`` (``tensorboard --logdir runs``
    shows every run). A resumed run purges the events of the epochs it recomputes."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer: Any = None

    def start(self, trainer: Trainer, start_epoch: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = start_epoch if start_epoch > 1 else None
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in trainer.cfg.to_dict().items()), 0)

    def epoch(self, trainer: Trainer, record: dict[str, Any]) -> None:
        step = int(record["epoch"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# -- training timeline ------------------------------------------------------------------------


class TimelineRecorder:
    """Embeds a fixed probe subset of the test split before training (epoch 0) and after every
    epoch and appends it to ``<run>/timeline.npz`` (see ``das_core.store.timeline``)."""

    def __init__(self, run_dir: Path, size: int) -> None:
        self.run_dir = run_dir
        self.size = size
        self.probe: DMLDataset | None = None
        self.timeline: Timeline | None = None

    def start(self, trainer: Trainer, start_epoch: int) -> None:
        from das_core.store.timeline import (
            Timeline,
            TimelineError,
            empty_timeline,
            probe_indices,
            timeline_path,
        )

        split = trainer.splits.test
        if split is None or len(split) == 0:
            log.info("no test split: no training timeline")
            return
        idx = probe_indices(len(split), self.size)
        self.probe = split.subset(idx, relabel=False)
        meta = {
            "dataset": trainer.splits.name,
            "split": "test",
            "split_size": len(split),
            "class_names": list(split.class_names),
        }
        path = timeline_path(self.run_dir)
        fresh = empty_timeline(idx, split.labels[idx], int(trainer.model.embedding_dim), meta)
        timeline = fresh
        if start_epoch > 1 and path.is_file():
            try:
                saved = Timeline.load(path)
                if np.array_equal(saved.indices, idx) and saved.meta.get("split_size") == len(split):
                    timeline = saved.keep_before(start_epoch)
                else:
                    log.warning("%s probes other images than this run: starting it again", path)
            except TimelineError as exc:
                log.warning("%s; starting the training timeline again", exc)
        self.timeline = timeline
        if start_epoch == 1:
            self._record(trainer, 0)

    def epoch(self, trainer: Trainer, record: dict[str, Any]) -> None:
        from das_core.store.timeline import timeline_due

        epoch = int(record["epoch"])
        if timeline_due(epoch, trainer.cfg.epochs):
            self._record(trainer, epoch)

    def _record(self, trainer: Trainer, epoch: int) -> None:
        from das_core.models.embed import embed_dataset
        from das_core.store.timeline import timeline_path

        if self.probe is None or self.timeline is None:
            return
        emb, _ = embed_dataset(
            trainer.model,
            self.probe,
            batch_size=trainer.cfg.eval_batch_size,
            device=trainer.device,
            num_workers=trainer.num_workers,
        )
        self.timeline = self.timeline.with_epoch(epoch, emb)
        self.timeline.save(timeline_path(self.run_dir))

    def close(self) -> None:
        pass
