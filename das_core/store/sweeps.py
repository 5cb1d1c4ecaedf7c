"""Sweep folders: what a sweep keeps on disk, and how the app and the CLI read it back.

Layout::

    <sweep>/sweep.json     the sweep (base config, search space, sampler, metric); every worker
                           that joins the study must agree with it
    <sweep>/study.db       the Optuna study (SQLite; resumable, shared by every worker)
    <sweep>/trial-0000/    one ordinary run folder per trial (checkpoints, metrics, summary.json)
    <sweep>/summary.json   the best trial so far (rewritten when a worker stops)
    <sweep>/progress.json  what the last worker is doing (state, trial, done, target)
    <sweep>/job.json ...   when launched from the app: the job queue's files (das_core.store.jobs)

Several processes may run ``python -m das_core sweep --out <sweep>`` at once, on one machine
or on several sharing the folder (over a network file system, only if it honours SQLite's
locks). A sweep folder sits directly in the runs root when the app launched it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from das_core.store import layout
from das_core.store.io import atomic_write_json, file_lock, read_json_object
from das_core.store.layout import RunLayout
from das_core.store.runs import RunInfo, read_run

if TYPE_CHECKING:
    import optuna

    from das_core.store.jobs import Job
    from das_core.training.config import TrainConfig
    from das_core.training.sweep import SweepConfig

SWEEP_FILE = "sweep.json"
STUDY_FILE = "study.db"
STUDY_NAME = "sweep"
SUMMARY_FILE = layout.SUMMARY
PROGRESS_FILE = layout.PROGRESS
LOCK_FILE = ".sweep.lock"
TRIAL_PREFIX = "trial-"
SQLITE_TIMEOUT = 120  # seconds a writer waits for another worker's write to finish
HEARTBEAT = 30  # seconds between a running trial's heartbeats
GRACE = 120  # a running trial whose heartbeat is this old is marked failed (its worker died)


def trial_dir(sweep_dir: Path, number: int) -> Path:
    return Path(sweep_dir) / f"{TRIAL_PREFIX}{number:04d}"


def is_sweep(path: Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def storage_url(sweep_dir: Path) -> str:
    return f"sqlite:///{(Path(sweep_dir) / STUDY_FILE).resolve()}"


def read_sweep_config(sweep_dir: Path) -> SweepConfig:
    """The sweep saved in ``sweep_dir`` (``ConfigError`` when missing or damaged)."""
    from das_core.training.config import ConfigError
    from das_core.training.sweep import SweepConfig

    path = Path(sweep_dir) / SWEEP_FILE
    data = read_json_object(path)
    if data is None:
        raise ConfigError("out", str(sweep_dir), f"holds no readable {SWEEP_FILE}: it is not a sweep folder")
    try:
        return SweepConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError("out", str(sweep_dir), f"its {SWEEP_FILE} is not a valid sweep: {exc}") from exc


def write_sweep_config(sweep_dir: Path, sweep: SweepConfig) -> None:
    atomic_write_json(Path(sweep_dir) / SWEEP_FILE, sweep.to_dict())


def prepare_sweep_folder(sweep_dir: Path, sweep: SweepConfig) -> None:
    """Create the folder and its ``sweep.json``, or check that the one there is this sweep
    (under a lock: two workers starting together agree on one file)."""
    from das_core.training.config import ConfigError

    folder = Path(sweep_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("out", str(folder), f"cannot create the sweep folder: {exc.strerror or exc}") from exc
    with file_lock(folder / LOCK_FILE):
        if not is_sweep(folder):
            if any(p.name not in (LOCK_FILE, layout.JOB, layout.JOB_LOCK, layout.LOG, layout.CONFIG)
                   for p in folder.iterdir()):
                raise ConfigError("out", str(folder), "is not empty and holds no sweep; choose a new folder")
            write_sweep_config(folder, sweep)
            return
        saved = read_sweep_config(folder)
        if saved.identity() != sweep.identity():
            mine, theirs = sweep.identity(), saved.identity()
            differs = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if "base" in differs:
                a, b = mine["base"], theirs["base"]
                differs = [*(k for k in differs if k != "base"),
                           *(f"base.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))]
            raise ConfigError(
                "out",
                str(folder),
                f"holds another sweep (differs in {', '.join(differs[:6])}); join it with "
                f"`python -m das_core sweep --out {folder}` alone, or choose another --out",
            )
        if sweep.n_trials != saved.n_trials and sweep.n_trials is not None:
            write_sweep_config(folder, saved.with_trials(sweep.n_trials))  # more (or fewer) trials


def _storage(sweep_dir: Path, *, heartbeat: bool = False, reader: bool = False) -> Any:
    """The study's storage; open it under the sweep's lock (``LOCK_FILE``), readers too. A
    ``reader`` (the app, ``--show``) creates no tables, but Optuna's storage still stamps the
    schema's version (alembic) when it finds the tables without one: a worker that has just
    created them under the lock, and not stamped them yet, then fails on its own stamp
    (``UNIQUE constraint failed: alembic_version.version_num``; seen when the Sweeps page, or a
    test, polled a sweep job as it started)."""
    import warnings

    import optuna

    extra: dict[str, Any] = {"heartbeat_interval": HEARTBEAT, "grace_period": GRACE} if heartbeat else {}
    if reader:
        extra["skip_table_creation"] = True
    with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna 5; it is what fails dead workers' trials
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            storage_url(sweep_dir), engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT}}, **extra
        )


def open_study(sweep_dir: Path, sweep: SweepConfig, *, sampler: Any = None, heartbeat: bool = False) -> optuna.Study:
    """The sweep's study, created on first use (``load_if_exists``: workers share it)."""
    import optuna

    with file_lock(Path(sweep_dir) / LOCK_FILE):  # table creation by two processes at once
        return optuna.create_study(
            storage=_storage(sweep_dir, heartbeat=heartbeat),
            sampler=sampler,
            study_name=STUDY_NAME,
            direction=sweep.direction,
            load_if_exists=True,
        )


def fail_trials_of(sweep_dir: Path, pid: int, host: str | None = None) -> list[int]:
    """Mark failed the trials still running that the worker ``host:pid`` started (default
    host: this machine); their numbers. For a worker known to be gone."""
    import socket

    import optuna
    from optuna.trial import TrialState

    folder = Path(sweep_dir)
    if not (folder / STUDY_FILE).is_file():
        return []
    worker = f"{host or socket.gethostname()}:{pid}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with file_lock(folder / LOCK_FILE):
        study = optuna.load_study(study_name=STUDY_NAME, storage=_storage(folder))
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("worker") == worker:
            study.tell(t.number, state=TrialState.FAIL)
            failed.append(t.number)
    return failed


def read_run_summary(run_dir: Path) -> dict[str, Any]:
    return read_json_object(RunLayout(Path(run_dir)).summary) or {}


def write_progress(sweep_dir: Path, *, state: str, trial: int | None, done: int, target: int) -> None:
    atomic_write_json(
        Path(sweep_dir) / PROGRESS_FILE,
        {"state": state, "trial": trial, "done": done, "target": target, "updated": time.time()},
    )


def read_progress(sweep_dir: Path) -> dict[str, Any]:
    return read_json_object(Path(sweep_dir) / PROGRESS_FILE) or {}


# -- reading a sweep ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialRow:
    """One trial of a sweep, as the app and the CLI show it."""

    number: int
    state: str  # complete | running | failed | pruned | waiting
    params: dict[str, Any]
    value: float | None
    run_dir: Path
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # "val" / "test" -> metrics

    @property
    def checkpoint(self) -> Path | None:
        return RunLayout(self.run_dir).checkpoint


@dataclass(frozen=True)
class SweepView:
    path: Path
    config: SweepConfig
    trials: list[TrialRow]

    @property
    def labels(self) -> list[str]:
        return [p.label for p in self.config.params]

    @property
    def complete(self) -> list[TrialRow]:
        return [t for t in self.trials if t.state == "complete" and t.value is not None]

    @property
    def best(self) -> TrialRow | None:
        done = self.complete
        if not done:
            return None
        sign = 1.0 if self.config.direction == "maximize" else -1.0
        return max(done, key=lambda t: (sign * float(t.value or 0.0), -t.number))

    @property
    def target(self) -> int:
        return self.config.target()

    @property
    def finished(self) -> bool:
        return len(self.complete) >= self.target


def load_sweep(sweep_dir: str | Path) -> SweepView:
    """The sweep in ``sweep_dir`` with every trial of its study (none yet when the study has
    not been created: a queued sweep). Reads only; never creates the study."""
    import optuna

    folder = Path(sweep_dir)
    config = read_sweep_config(folder)
    rows: list[TrialRow] = []
    if (folder / STUDY_FILE).is_file():
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from sqlalchemy.exc import SQLAlchemyError

        try:
            with file_lock(folder / LOCK_FILE):  # not while a worker creates the study (see _storage)
                study = optuna.load_study(study_name=STUDY_NAME, storage=_storage(folder, reader=True))
        except (KeyError, SQLAlchemyError):  # the file exists, the study is not in it yet (being created)
            study = None
        for t in study.get_trials(deepcopy=False) if study is not None else []:
            value = t.value if t.value is not None and math.isfinite(t.value) else None
            run = str(t.user_attrs.get("run_dir") or trial_dir(folder, t.number).name)
            scores = {s: dict(t.user_attrs[s]) for s in ("val", "test") if isinstance(t.user_attrs.get(s), dict)}
            rows.append(TrialRow(
                number=t.number, state=_STATES.get(t.state.name, t.state.name.lower()), params=dict(t.params),
                value=value, run_dir=folder / Path(run).name, scores=scores,
            ))
    rows.sort(key=lambda r: r.number)
    return SweepView(folder, config, rows)


_STATES = {"COMPLETE": "complete", "RUNNING": "running", "FAIL": "failed", "PRUNED": "pruned", "WAITING": "waiting"}


def write_summary(sweep_dir: Path) -> dict[str, Any]:
    """``summary.json`` of the sweep: the best trial (its parameters, value and run folder)."""
    view = load_sweep(sweep_dir)
    best = view.best
    counts: dict[str, int] = {}
    for t in view.trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    summary = {
        "metric": view.config.metric,
        "direction": view.config.direction,
        "target": view.target,
        "trials": counts,
        "best": None if best is None else {
            "trial": best.number, "params": best.params, "value": best.value, "run_dir": best.run_dir.name,
        },
    }
    atomic_write_json(Path(sweep_dir) / SUMMARY_FILE, summary)
    return summary


def find_sweeps(root: Path) -> list[Path]:
    """Sweep folders directly in ``root`` (the runs root), newest first."""
    if not Path(root).is_dir():
        return []
    found = [d for d in Path(root).iterdir() if d.is_dir() and not d.name.startswith(".") and is_sweep(d)]
    found.sort(key=lambda d: (d.stat().st_mtime, d.name), reverse=True)
    return found


def trial_runs(sweep_dir: Path) -> list[RunInfo]:
    """The trial run folders of one sweep (by trial number) with a checkpoint or metrics in
    them (files only: the study is not opened)."""
    found = (read_run(d) for d in sorted(Path(sweep_dir).glob(f"{TRIAL_PREFIX}*")) if d.is_dir())
    return [r for r in found if r is not None]


def trial_checkpoints(root: Path) -> list[tuple[str, Path]]:
    """``(label, checkpoint)`` of every trial with a checkpoint in the sweeps under ``root``,
    for the checkpoint pickers (files only: the study is not opened)."""
    out: list[tuple[str, Path]] = []
    for sweep in find_sweeps(root):
        for run in sorted(sweep.glob(f"{TRIAL_PREFIX}*")):
            ckpt = RunLayout(run).checkpoint
            if ckpt is not None:
                out.append((f"sweep · {sweep.name} · {run.name}", ckpt))
    return out


# -- the job queue --------------------------------------------------------------------------------


def submit_sweep(
    sweep: SweepConfig, *, runs_root: str | Path | None = None, device: str | None = None, name: str | None = None
) -> Job:
    """Queue a sweep as a job of kind ``sweep``: its run folder is the sweep folder, and the
    device's worker runs ``python -m das_core sweep --out <folder>`` there."""
    import dataclasses

    from das_core.store import jobs

    sweep.validate()

    def prepare(folder: Path, config: TrainConfig) -> None:  # the base as the job runs it (its device)
        write_sweep_config(folder, dataclasses.replace(sweep, base=config.replace(out=None)))

    shown = f"sweep · {', '.join(p.spec() for p in sweep.params)} · {sweep.sampler} · {sweep.target()} trials"
    return jobs.submit(sweep.base, runs_root=runs_root, device=device, name=name or shown, kind="sweep",
                       prepare=prepare)


def describe(view: SweepView) -> dict[str, Any]:
    """A JSON-able account of a sweep (``python -m das_core sweep --out DIR --show``)."""
    best = view.best
    return {
        "sweep": str(view.path),
        "sampler": view.config.sampler,
        "metric": view.config.metric,
        "direction": view.config.direction,
        "target": view.target,
        "trials": [
            {"trial": t.number, "state": t.state, "params": t.params, "value": t.value, "run_dir": str(t.run_dir)}
            for t in view.trials
        ],
        "best": None if best is None else {"trial": best.number, "params": best.params, "value": best.value},
    }


def dumps(view: SweepView) -> str:
    return json.dumps(describe(view), indent=2)
