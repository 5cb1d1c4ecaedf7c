"""Background training jobs: a queue on disk, one worker process per device.

The app's Train page submits a config; the job lives in its own run folder under the runs root,
so a page reload or an app restart finds it again, and a finished job is an ordinary run folder
(checkpoints, ``metrics.jsonl``) that the checkpoint pickers list.

Layout (a run folder's file names: ``das_core.store.layout``)::

    <runs root>/<YYYYmmdd-HHMMSS>-<8 hex>-<tag>/   one job = one run folder
        config.yaml   the resolved config (out = this folder, device = the job's device)
        job.json      the job's state (``Job``), rewritten atomically on every change
        train.log     stdout + stderr of ``python -m das_core train``
        cancel        flag file: cancel requested while running (the worker kills the training)
        ...           what training writes (progress.json, metrics.jsonl, *.safetensors)
    <runs root>/.jobs/
        queue.lock            fcntl lock around "who runs next / is a worker there" decisions
        worker-<device>.lock  held by the device's worker for its whole life
        worker-<device>.json  the live worker's pid (for status and clean-up)
        worker-<device>.log   the workers' own log

Workers. ``python -m das_core jobs worker --device D --runs-root R`` runs the device's queued
jobs oldest first, one at a time, and exits when none is left. It is started detached (its own
session, output to its log), so it outlives the Streamlit process that started it. Exactly one
worker per device and runs root: the worker lock is an exclusive ``flock`` taken by whoever
starts the worker (under the queue lock) and handed to the worker process as an open file
descriptor, so it is held without a gap from the decision to start a worker until that worker
exits (the kernel drops it if the worker dies).

No lost wake-up. A job submitted at the moment the worker decides the queue is empty must not
be left queued with no worker. ``submit`` writes ``job.json`` first, then, holding the queue
lock, starts a worker if the worker lock is free. The worker looks for the next job holding the
same queue lock and, when there is none, releases the worker lock *before* it releases the queue
lock. So either the worker looks after the job was written (and runs it), or it has released the
worker lock by the time ``submit`` checks it (and ``submit`` starts a new worker).

Locks are always taken in the order queue lock -> job lock (``<run>/.job.lock``), never the
reverse. The worker reaps its training process and records the result in one job-lock section,
so ``list_jobs`` never mistakes a finished-but-not-yet-recorded job for a dead one.

Threads. CPU jobs run with ``OMP_NUM_THREADS`` = ``MKL_NUM_THREADS`` = max(1, cores - 1): one core
stays free for the app (and this queue), which stays responsive while a model trains.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from das_core.messages import clip
from das_core.runtime import DeviceError, cpu_cores, resolve_device
from das_core.store import layout
from das_core.store.io import atomic_write_json, file_lock, read_json_object
from das_core.store.layout import RunLayout
from das_core.store.runs import REPO_ROOT, default_runs_root
from das_core.training.config import ConfigError, TrainConfig, dump_config

log = logging.getLogger("das_core.store.jobs")

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATES = frozenset({"done", "failed", "cancelled"})
DEVICES = ("cpu", "cuda")
KINDS = ("train", "sweep")  # a sweep job runs ``python -m das_core sweep --out <its folder>``
JOBS_DIR = ".jobs"
DEFAULT_GRACE = 10.0  # seconds between SIGTERM and SIGKILL when cancelling
DEFAULT_POLL = 0.5  # seconds between the worker's looks at its training process
ERROR_TAIL_LINES = 20
DIED = "the training process died"
MAX_JOB_FILE = 4 * 1024 * 1024


class JobError(ValueError):
    """A job reference that does not name a job, or a job request that cannot be honoured."""


@dataclass
class Job:
    """One background training job (the content of its ``job.json``)."""

    id: str
    run_dir: Path
    device: str
    state: str
    created: float
    started: float | None = None
    finished: float | None = None
    pid: int | None = None
    returncode: int | None = None
    error: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    kind: str = "train"

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    @property
    def log_path(self) -> Path:
        return RunLayout(self.run_dir).log

    @property
    def cancel_requested(self) -> bool:
        return RunLayout(self.run_dir).cancel.exists()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["run_dir"] = str(self.run_dir)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], run_dir: Path) -> Job:
        """A job from its ``job.json`` content, validated field by field (``JobError`` naming
        the file and the field otherwise). Its id is its folder's name: a copied run folder is
        another job, whatever id the copied file holds."""
        where = RunLayout(run_dir).job
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        for key, check, what in _JOB_FIELDS:
            if key in values and not check(values[key]):
                raise JobError(f"{where}: {key!r} must be {what}, not {clip(values[key])}")
        for key in ("device", "state", "created"):
            if key not in values:
                raise JobError(f"{where}: it has no {key!r}")
        values["run_dir"] = run_dir  # the folder it was read from wins (folders can be moved)
        values["id"] = run_dir.name
        return cls(**values)


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _optional(check: Any) -> Any:
    return lambda v: v is None or check(v)


def _small_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -(2**31) <= v < 2**31


_JOB_FIELDS: tuple[tuple[str, Any, str], ...] = (
    ("state", lambda v: v in STATES, "one of " + ", ".join(STATES)),
    ("device", lambda v: v in DEVICES, "one of " + ", ".join(DEVICES)),
    ("created", _number, "a time (seconds since 1970)"),
    ("started", _optional(_number), "a time (seconds since 1970) or null"),
    ("finished", _optional(_number), "a time (seconds since 1970) or null"),
    ("pid", _optional(lambda v: _small_int(v) and v > 0), "a process id or null"),
    ("returncode", _optional(_small_int), "an exit code or null"),
    ("error", _optional(lambda v: isinstance(v, str) and len(v) <= 1_000_000), "text or null"),
    ("config", lambda v: isinstance(v, dict), "a mapping"),
    ("name", lambda v: isinstance(v, str) and len(v) <= 1000, "text (up to 1000 characters)"),
    ("kind", lambda v: v in KINDS, "one of " + ", ".join(KINDS)),
)


@dataclass(frozen=True)
class DamagedJob:
    """A run folder whose ``job.json`` cannot be read as a job: shown with its problem."""

    run_dir: Path
    problem: str

    @property
    def id(self) -> str:
        return self.run_dir.name


# -- paths and small helpers ----------------------------------------------------------------------


def _root(runs_root: str | Path | None) -> Path:
    return (Path(runs_root) if runs_root is not None else default_runs_root()).expanduser().resolve()


def _jobs_dir(root: Path) -> Path:
    return root / JOBS_DIR


def _queue_lock(root: Path) -> Path:
    return _jobs_dir(root) / "queue.lock"


def _worker_lock(root: Path, device: str) -> Path:
    return _jobs_dir(root) / f"worker-{device}.lock"


def worker_info_path(root: Path, device: str) -> Path:
    return _jobs_dir(root) / f"worker-{device}.json"


def worker_log_path(root: Path, device: str) -> Path:
    return _jobs_dir(root) / f"worker-{device}.log"


def _job_lock(run_dir: Path) -> contextlib.AbstractContextManager[None]:
    return file_lock(RunLayout(run_dir).job_lock)


def read_job(run_dir: Path) -> Job | None:
    """The job in ``run_dir``, or ``None`` if it holds no valid ``job.json``."""
    found = read_job_or_problem(run_dir)
    return found if isinstance(found, Job) else None


def read_job_or_problem(run_dir: Path) -> Job | DamagedJob | None:
    """The job in ``run_dir``; a ``DamagedJob`` saying what is wrong with its ``job.json``;
    ``None`` when there is no ``job.json`` (a plain run folder)."""
    path = RunLayout(run_dir).job
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return DamagedJob(run_dir, f"{path}: cannot read it: {exc.strerror or exc}")
    if len(raw) > MAX_JOB_FILE:
        return DamagedJob(run_dir, f"{path}: {len(raw):,} bytes, more than a job file holds ({MAX_JOB_FILE:,})")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return DamagedJob(run_dir, f"{path}: not valid JSON")
    if not isinstance(data, dict):
        return DamagedJob(run_dir, f"{path}: not a JSON object but {clip(data)}")
    try:
        return Job.from_dict(data, run_dir)
    except JobError as exc:
        return DamagedJob(run_dir, str(exc))


def _write_job(job: Job) -> None:
    atomic_write_json(RunLayout(job.run_dir).job, job.to_dict())


def cpu_job_threads() -> int:
    """Threads a CPU training job may use: all cores but one, so the app stays responsive."""
    return max(1, cpu_cores() - 1)


# -- processes ------------------------------------------------------------------------------------


def _proc_status(pid: int) -> str:
    """``"alive"``, ``"zombie"`` (exited, not yet reaped) or ``"gone"``."""
    if pid <= 0:
        return "gone"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        return "alive"  # someone else's process: alive, and (see _cmdline) not ours
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "alive"
    return "zombie" if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X") else "alive"


def _cmdline(pid: int) -> list[str] | None:
    """The process's argv, or ``None`` where /proc cannot tell."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def _is_our_process(pid: int, *markers: str) -> bool:
    """``pid`` is alive and its command line holds every marker (guards against pid reuse)."""
    if _proc_status(pid) != "alive":
        return False
    argv = _cmdline(pid)
    if argv is None:
        return not Path("/proc").is_dir()  # no /proc (not Linux): trust the pid
    return all(any(m == a or m in a for a in argv) for m in markers)


def _is_training_process(job: Job) -> bool:
    return job.pid is not None and _is_our_process(job.pid, "das_core", job.kind, str(job.run_dir))


def worker_pid(runs_root: str | Path | None, device: str) -> int | None:
    """The pid of the live worker of ``device``, if there is one."""
    root = _root(runs_root)
    info = read_json_object(worker_info_path(root, device)) or {}
    pid = info.get("pid")
    if isinstance(pid, int) and _is_our_process(pid, "das_core", "worker", str(root)):
        return pid
    return None


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _try_lock(path: Path) -> int | None:
    """Take an exclusive flock on ``path`` without waiting: the open fd, or ``None`` if held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    return fd


def _child_env(device: str | None) -> dict[str, str]:
    """The environment of a worker (``device`` None) or of a training process."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if device == "cpu":
        threads = str(cpu_job_threads())
        env["OMP_NUM_THREADS"] = threads
        env["MKL_NUM_THREADS"] = threads
    return env


# -- submitting -----------------------------------------------------------------------------------


def _as_config(cfg: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    if isinstance(cfg, TrainConfig):
        cfg.validate()
        return cfg
    return TrainConfig.from_mapping(cfg)


def _pick_device(requested: str | None, cfg: TrainConfig) -> str:
    choice = requested or (cfg.device if cfg.device != "auto" else None)
    if choice not in (None, "auto", *DEVICES):
        raise ConfigError("device", choice, "must be one of auto, " + ", ".join(DEVICES))
    try:
        return resolve_device(choice).type
    except DeviceError:
        raise ConfigError("device", choice, "no CUDA GPU is available on this machine; use cpu") from None


def job_tag(cfg: TrainConfig) -> str:
    tag = f"{cfg.dataset}-{cfg.loss}{'-das' if cfg.das else ''}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", tag)[:60]


def default_name(cfg: TrainConfig) -> str:
    return f"{cfg.dataset} · {cfg.loss}{' + DAS' if cfg.das else ''} · {cfg.backbone} · {cfg.epochs} ep"


def _make_run_dir(root: Path, tag: str) -> Path:
    """Create a new, unique run folder: ``mkdir`` is atomic, so two sessions submitting at the
    same moment get two folders (the random part differs; a collision just draws again)."""
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        path = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}-{tag}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise JobError(f"could not create a new run folder in {root}")  # pragma: no cover


def submit(
    cfg: TrainConfig | Mapping[str, Any],
    *,
    runs_root: str | Path | None = None,
    device: str | None = None,
    name: str | None = None,
    kind: str = "train",
    prepare: Callable[[Path, TrainConfig], None] | None = None,
) -> Job:
    """Queue a training job and make sure its device has a worker. The config is validated
    first: a ``ConfigError`` is raised before anything is written. ``device``: "cpu" or
    "cuda"; default: the config's device, "auto" meaning CUDA when there is a GPU. ``kind``
    "sweep": ``prepare(run_dir, config)`` writes the sweep into the new folder (see
    ``das_core.store.sweeps.submit_sweep``), and the worker runs it."""
    if kind not in KINDS:
        raise JobError(f"unknown job kind {kind!r}; use one of {', '.join(KINDS)}")
    config = _as_config(cfg)
    dev = _pick_device(device, config)
    root = _root(runs_root)
    run_dir = _make_run_dir(root, job_tag(config) if kind == "train" else f"{kind}-{job_tag(config)}")
    try:
        config = config.replace(out=str(run_dir), device=dev)
        dump_config(config, RunLayout(run_dir).config)
        if prepare is not None:
            prepare(run_dir, config)
        job = Job(
            id=run_dir.name,
            run_dir=run_dir,
            device=dev,
            state="queued",
            created=time.time(),
            config=config.to_dict(),
            name=name or default_name(config),
            kind=kind,
        )
        _write_job(job)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    ensure_worker(dev, root)
    return job


def ensure_worker(device: str, runs_root: str | Path | None = None) -> bool:
    """Start the worker of ``device`` unless one is alive; True if one was started."""
    root = _root(runs_root)
    with file_lock(_queue_lock(root)):
        fd = _try_lock(_worker_lock(root, device))
        if fd is None:
            return False  # a live worker holds it; it looks at the queue before it exits
        try:
            _spawn_worker(root, device, fd)
        finally:
            os.close(fd)  # the worker holds its own copy of the locked descriptor
    return True


def _spawn_worker(root: Path, device: str, lock_fd: int) -> None:
    cmd = [
        sys.executable, "-m", "das_core", "jobs", "worker",
        "--device", device, "--runs-root", str(root), "--lock-fd", str(lock_fd),
    ]  # fmt: skip
    log_path = worker_log_path(root, device)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=_child_env(None),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the app (and its Ctrl-C) going away
            pass_fds=(lock_fd,),
        )
    # Reap it when it exits (no zombie in a long-lived app); never blocks the caller.
    threading.Thread(target=proc.wait, name=f"reap-worker-{proc.pid}", daemon=True).start()
    log.info("started the %s worker (pid %d) for %s", device, proc.pid, root)


# -- reading --------------------------------------------------------------------------------------


def _job_dirs(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        return
    for d in root.iterdir():
        if d.is_dir() and not d.name.startswith(".") and RunLayout(d).job.is_file():
            yield d


def scan_jobs(runs_root: str | Path | None = None) -> tuple[list[Job], list[DamagedJob]]:
    """Every job under the runs root, newest first, and the run folders whose ``job.json`` is
    damaged (each with its problem; one bad file never hides the others). Reconciles as it
    reads: a running job whose training process is gone is recorded as failed (or done, if
    training had finished), and a device with queued jobs but no live worker gets one."""
    root = _root(runs_root)
    found = [read_job_or_problem(d) for d in _job_dirs(root)]
    jobs = [j for j in found if isinstance(j, Job)]
    damaged = sorted((j for j in found if isinstance(j, DamagedJob)), key=lambda j: j.id)
    alive = {dev: worker_pid(root, dev) is not None for dev in {j.device for j in jobs}}
    jobs = [_reconcile(j, alive[j.device]) if j.state == "running" else j for j in jobs]
    for dev in sorted({j.device for j in jobs if j.state == "queued"}):
        if not alive.get(dev):
            ensure_worker(dev, root)
    jobs.sort(key=lambda j: (j.created, j.id), reverse=True)
    return jobs, damaged


def list_jobs(runs_root: str | Path | None = None) -> list[Job]:
    """Every readable job under the runs root, newest first (see ``scan_jobs``)."""
    return scan_jobs(runs_root)[0]


def get_job(ref: str | Path, runs_root: str | Path | None = None) -> Job:
    """The job named by its id (run folder name) or its run folder (under the runs root)."""
    run_dir = _resolve_ref(ref, runs_root)
    found = read_job_or_problem(run_dir)
    if isinstance(found, DamagedJob):
        raise JobError(found.problem)
    if found is None:
        raise JobError(f"no job {clip(str(ref))} in {run_dir.parent} (no {layout.JOB} in {run_dir})")
    return found


def _resolve_ref(ref: str | Path, runs_root: str | Path | None) -> Path:
    """A job id or a run folder, which must be a folder directly in the runs root: a reference
    never reaches outside it (``../other/<id>``, a symlink out)."""
    root = _root(runs_root)
    text = str(ref)
    if "\0" in text or len(text) > 4096:
        raise JobError(f"{clip(text)} is not a job id")
    p = Path(text).expanduser()
    candidate = p if (len(p.parts) > 1 or p.is_absolute()) else root / text
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError) as exc:
        raise JobError(f"{clip(text)} is not a job id: {exc}") from exc
    if resolved.parent != root or text in (".", ".."):
        raise JobError(
            f"{clip(text)} is not a job of the runs root {root}: give a job id (its folder's name, "
            "see `python -m das_core jobs list`) or a run folder directly inside the runs root"
        )
    return resolved


def read_progress(job: Job) -> dict[str, Any]:
    """The run's ``progress.json`` (state, epoch, epochs, step, steps, loss, eta, ...) or {}."""
    return read_json_object(RunLayout(job.run_dir).progress) or {}


def log_tail(job: Job | Path, n: int = 40) -> str:
    """The last ``n`` lines of the job's ``train.log`` ("" if there is none)."""
    path = job.log_path if isinstance(job, Job) else Path(job)
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            data = fh.read()
    except OSError:
        return ""
    lines = data.decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-n:])


# -- finishing ------------------------------------------------------------------------------------


def _with_tail(reason: str, job: Job) -> str:
    tail = log_tail(job, ERROR_TAIL_LINES)
    return f"{reason}\n\nlast lines of {layout.LOG}:\n{tail}" if tail else reason


def _error_line(job: Job) -> str | None:
    for line in reversed(log_tail(job, 400).splitlines()):
        if line.startswith("error:"):
            return line[len("error:") :].strip()
    return None


def failure_reason(job: Job, returncode: int) -> str:
    """A short reason for a non-zero exit, from the log's last ``error:`` line if it has one."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the training process was killed by {name}"
    return _error_line(job) or f"training exited with code {returncode}"


def _finish(job: Job, state: str, returncode: int | None, error: str | None) -> Job:
    job.state, job.returncode, job.finished = state, returncode, time.time()
    job.error = error
    _write_job(job)
    log.info("job %s: %s%s", job.id, state, f" ({error.splitlines()[0]})" if error else "")
    return job


def _close_sweep(job: Job, pid: int) -> None:
    """A sweep's process has ended: the trials it left running (killed mid-trial, before it
    could record them) are failed now, so the study never shows a dead trial as running."""
    try:
        from das_core.store.sweeps import fail_trials_of

        fail_trials_of(job.run_dir, pid)
    except Exception as exc:  # the job's own outcome is still recorded; a resume fails them too
        log.warning("job %s: could not close its sweep's trials: %s", job.id, exc)


def _record_exit(job: Job, returncode: int) -> Job:
    if returncode == 0:
        return _finish(job, "done", 0, None)
    if job.cancel_requested:
        return _finish(job, "cancelled", returncode, None)
    return _finish(job, "failed", returncode, _with_tail(failure_reason(job, returncode), job))


def _record_vanished(job: Job) -> Job:
    """The training process is gone and nobody saw it exit: judge by what it left behind."""
    progress = read_progress(job)
    if progress.get("state") == "done" and RunLayout(job.run_dir).summary.is_file():
        return _finish(job, "done", None, None)
    if job.cancel_requested:
        return _finish(job, "cancelled", None, None)
    return _finish(job, "failed", None, _with_tail(DIED, job))


def _reconcile(job: Job, worker_alive: bool) -> Job:
    """Fix a "running" job whose training process is gone (or whose pid now belongs to
    another program). A zombie with a live worker is left alone: the worker is about to reap
    it and record the exit status."""
    if _is_training_process(job):
        return job
    with _job_lock(job.run_dir):
        current = read_job(job.run_dir)
        if current is None or current.state != "running":
            return current or job
        if _is_training_process(current):
            return current
        if current.pid is not None and worker_alive and _proc_status(current.pid) == "zombie":
            return current
        return _record_vanished(current)


# -- cancelling -----------------------------------------------------------------------------------


def cancel(ref: str | Path, runs_root: str | Path | None = None, *, grace: float = DEFAULT_GRACE) -> str:
    """Cancel a job (id or run folder) and return its new state: a queued job is cancelled at
    once; a running one gets a ``cancel`` flag that its worker acts on (SIGTERM to the training's
    process group, SIGKILL after ``grace`` seconds), so it stays "running" for a moment, unless
    its worker is gone, then it is killed here. A finished job is left as it is."""
    job = get_job(ref, runs_root)
    run_dir = job.run_dir
    root = run_dir.parent
    with file_lock(_queue_lock(root)), _job_lock(run_dir):
        current = read_job(run_dir) or job
        if current.state == "queued":
            return _finish(current, "cancelled", None, None).state
        if current.state != "running":
            return current.state
        RunLayout(run_dir).cancel.touch()
    if worker_pid(root, current.device) is None and _is_training_process(current):
        _terminate(current, grace)
        return _reconcile(current, worker_alive=False).state
    return "running"


def _terminate(job: Job, grace: float) -> None:
    """SIGTERM the training's process group, then SIGKILL if it outlives ``grace`` seconds."""
    assert job.pid is not None
    _kill_group(job.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _proc_status(job.pid) == "alive":
        time.sleep(0.1)
    if _proc_status(job.pid) == "alive":
        _kill_group(job.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and _proc_status(job.pid) == "alive":
            time.sleep(0.05)


# -- the worker -----------------------------------------------------------------------------------


class Worker:
    """Runs one device's queued jobs one at a time; see the module docstring for the locking."""

    def __init__(
        self, device: str, runs_root: Path, lock_fd: int, *, grace: float = DEFAULT_GRACE, poll: float = DEFAULT_POLL
    ) -> None:
        self.device, self.root, self.lock_fd = device, runs_root, lock_fd
        self.grace, self.poll = grace, poll

    def run(self) -> None:
        atomic_write_json(
            worker_info_path(self.root, self.device),
            {"pid": os.getpid(), "device": self.device, "started": time.time(), "runs_root": str(self.root)},
        )
        try:
            self._adopt_orphans()
            while (taken := self._take_next()) is not None:
                self._watch(*taken)
        finally:
            if self.lock_fd >= 0:  # left by an error: still give up under the queue lock
                with file_lock(_queue_lock(self.root)):
                    self._release()

    def _release(self) -> None:
        """Give up being the device's worker (idempotent)."""
        if self.lock_fd < 0:
            return
        with contextlib.suppress(OSError):
            worker_info_path(self.root, self.device).unlink()
        with contextlib.suppress(OSError):
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
            os.close(self.lock_fd)
        self.lock_fd = -1

    def _queued(self) -> list[Job]:
        jobs = [j for j in (read_job(d) for d in _job_dirs(self.root)) if j is not None]
        return sorted((j for j in jobs if j.state == "queued" and j.device == self.device), key=lambda j: (j.created, j.id))

    def _take_next(self) -> tuple[Job, subprocess.Popen[bytes]] | None:
        """Start the oldest queued job; with none left, stop being the worker. Both happen under
        the queue lock (the lost-wake-up argument in the module docstring)."""
        with file_lock(_queue_lock(self.root)):
            for job in self._queued():
                with _job_lock(job.run_dir):
                    current = read_job(job.run_dir)
                    if current is None or current.state != "queued":
                        continue
                    return current, self._start(current)
            self._release()
            return None

    def _start(self, job: Job) -> subprocess.Popen[bytes]:
        if job.kind == "sweep":  # the sweep is in the folder's sweep.json (das_core.store.sweeps)
            cmd = [sys.executable, "-m", "das_core", "sweep", "--out", str(job.run_dir), "--no-progress"]
        else:
            cmd = [
                sys.executable, "-m", "das_core", "train",
                "--config", str(RunLayout(job.run_dir).config), "--out", str(job.run_dir), "--no-progress",
            ]  # fmt: skip
        with open(job.log_path, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env=_child_env(job.device),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: cancel kills DataLoader workers too
            )
        job.state, job.pid, job.started = "running", proc.pid, time.time()
        _write_job(job)
        log.info("job %s: running (pid %d)", job.id, proc.pid)
        return proc

    def _watch(self, job: Job, proc: subprocess.Popen[bytes]) -> None:
        """Wait for the training to end, acting on a cancel request; record how it ended."""
        term_sent: float | None = None
        while True:
            if not job.run_dir.is_dir():  # the run folder was deleted under it: stop the training
                log.warning("job %s: its run folder is gone; stopping the training", job.id)
                _kill_group(proc.pid, signal.SIGKILL)
                proc.wait()
                return
            with _job_lock(job.run_dir):
                returncode = proc.poll()
                if returncode is not None:
                    if job.kind == "sweep":
                        _close_sweep(job, proc.pid)
                    _record_exit(read_job(job.run_dir) or job, returncode)
                    return
            if job.cancel_requested:
                if term_sent is None:
                    log.info("job %s: cancel requested, sending SIGTERM", job.id)
                    _kill_group(proc.pid, signal.SIGTERM)
                    term_sent = time.monotonic()
                elif time.monotonic() - term_sent > self.grace:
                    log.info("job %s: still alive %.0f s after SIGTERM, sending SIGKILL", job.id, self.grace)
                    _kill_group(proc.pid, signal.SIGKILL)
            time.sleep(self.poll)

    def _adopt_orphans(self) -> None:
        """A previous worker died with its training still running (that process has its own
        session and lives on): wait for it, so the device never runs two trainings at once."""
        for d in _job_dirs(self.root):
            job = read_job(d)
            if job is None or job.state != "running" or job.device != self.device:
                continue
            log.info("job %s: adopting the running training (pid %s)", job.id, job.pid)
            term_sent: float | None = None
            while _is_training_process(job):
                if job.cancel_requested and term_sent is None:
                    assert job.pid is not None
                    _terminate(job, self.grace)
                    term_sent = time.monotonic()
                time.sleep(self.poll)
            _reconcile(job, worker_alive=False)


def run_worker(
    device: str,
    runs_root: str | Path | None = None,
    *,
    lock_fd: int | None = None,
    grace: float = DEFAULT_GRACE,
    poll: float = DEFAULT_POLL,
) -> int:
    """The worker process's main: 0 when the queue is empty (or another worker has it)."""
    if device not in DEVICES:
        raise JobError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    root = _root(runs_root)
    fd = lock_fd if lock_fd is not None else _try_lock(_worker_lock(root, device))
    if fd is None:
        log.info("another %s worker is running for %s; nothing to do", device, root)
        return 0
    log.info("%s worker (pid %d) for %s", device, os.getpid(), root)
    Worker(device, root, fd, grace=grace, poll=poll).run()
    log.info("%s worker: queue empty, exiting", device)
    return 0


# -- CLI (``python -m das_core jobs ...``) --------------------------------------------------------


def add_jobs_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    jobs = sub.add_parser("jobs", help="background training jobs (the app's queue)")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    w = jsub.add_parser("worker", help="run one device's queued jobs until none is left (the app starts it)")
    w.add_argument("--device", required=True, choices=DEVICES)
    w.add_argument("--runs-root", default=None, help="runs folder (default: $DAS_RUNS_DIR or runs/)")
    w.add_argument("--grace", type=float, default=DEFAULT_GRACE, help="seconds from SIGTERM to SIGKILL on cancel")
    w.add_argument("--lock-fd", type=int, default=None, help=argparse.SUPPRESS)
    ls = jsub.add_parser("list", help="list the jobs, newest first")
    ls.add_argument("--runs-root", default=None)
    ls.add_argument("--json", action="store_true", help="print JSON")
    c = jsub.add_parser("cancel", help="cancel a queued or running job")
    c.add_argument("job", help="job id (its run folder's name) or run folder")
    c.add_argument("--runs-root", default=None)


def cmd_jobs(args: argparse.Namespace) -> int:
    """``python -m das_core jobs``; user errors print one ``error:`` line and return 2."""
    try:
        if args.jobs_command == "worker":
            return run_worker(args.device, args.runs_root, lock_fd=args.lock_fd, grace=args.grace)
        if args.jobs_command == "cancel":
            print(cancel(args.job, args.runs_root))
            return 0
        _print_jobs(*scan_jobs(args.runs_root), as_json=args.json)
        return 0
    except (JobError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _print_jobs(jobs: list[Job], damaged: list[DamagedJob], *, as_json: bool) -> None:
    if as_json:
        rows = [j.to_dict() for j in jobs]
        rows += [{"id": d.id, "run_dir": str(d.run_dir), "state": "damaged", "error": d.problem} for d in damaged]
        print(json.dumps(rows, indent=2, default=str))
        return
    for j in jobs:
        progress = read_progress(j) if j.state == "running" else {}
        epoch, epochs = progress.get("epoch"), progress.get("epochs")
        where = f" epoch {epoch}/{epochs}" if isinstance(epoch, int) and isinstance(epochs, int) else ""
        print(f"{j.id:<48} {j.state:<9} {j.device:<4}{where}  {j.name}")
        if j.error:
            print("    " + j.error.splitlines()[0])
    for d in damaged:
        print(f"{d.id:<48} damaged   {d.problem}")
