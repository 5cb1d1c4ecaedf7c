"""Background training jobs: the queue on disk, one worker per device, cancel, failures."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from das_core.store import jobs
from das_core.store.runs import list_runs
from das_core.training.config import ConfigError, TrainConfig

REPO = Path(__file__).resolve().parent.parent
TINY = {
    "dataset": "digits",
    "backbone": "small-cnn",
    "embedding_dim": 16,
    "batch_size": 50,
    "samples_per_class": 10,
    "epochs": 1,
    "device": "cpu",
}
QUICK = {**TINY, "steps_per_epoch": 3}  # a few seconds, most of it importing torch
LONG = {**TINY, "epochs": 1000, "steps_per_epoch": 100000}  # runs until cancelled or killed


def wait_for(predicate: Callable[[], Any], timeout: float = 90.0, what: str = "condition") -> Any:
    """Poll ``predicate`` (every 0.2 s) until it holds: a wait for the condition, with a deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_state(root: Path, job: jobs.Job) -> jobs.Job:
    return jobs.get_job(job.id, root)


def wait_state(root: Path, job: jobs.Job, states: tuple[str, ...], timeout: float = 90.0) -> jobs.Job:
    def check() -> jobs.Job | None:
        current = jobs.get_job(job.id, root)
        return current if current.state in states else None

    found: jobs.Job = wait_for(check, timeout, f"{job.id} to be {'/'.join(states)}")
    return found


def wait_worker_gone(root: Path) -> None:
    wait_for(lambda: jobs.worker_pid(root, "cpu") is None, 30, "the worker to exit")


def kill_leftovers(root: Path) -> None:
    """Teardown: kill any training or worker process a test left behind (by pid files)."""
    for run_dir in root.iterdir() if root.is_dir() else []:
        job = jobs.read_job(run_dir)
        if job is not None and job.pid is not None and jobs._is_training_process(job):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
    for device in jobs.DEVICES:
        pid = jobs.worker_pid(root, device)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture()
def root(tmp_path: Path) -> Iterator[Path]:
    r = tmp_path / "runs"
    yield r
    kill_leftovers(r)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[jobs.Job]]]:
    """Two quick jobs submitted from two threads at the same moment, run to the end."""
    r = tmp_path_factory.mktemp("jobs") / "runs"
    barrier = threading.Barrier(2)
    submitted: list[jobs.Job] = []

    def go(seed: int) -> None:
        cfg = TrainConfig.from_mapping({**QUICK, "seed": seed})
        barrier.wait()
        submitted.append(jobs.submit(cfg, runs_root=r, name=f"seed {seed}"))

    threads = [threading.Thread(target=go, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        done = [wait_state(r, j, ("done", "failed", "cancelled"), timeout=120) for j in submitted]
        wait_worker_gone(r)
        yield r, done
    finally:
        kill_leftovers(r)


def test_two_simultaneous_submits_both_run_one_after_the_other(finished: tuple[Path, list[jobs.Job]]) -> None:
    root, done = finished
    assert len({j.run_dir for j in done}) == 2  # two folders, nothing overwritten
    for job in done:
        assert job.state == "done", job.error
        assert job.returncode == 0 and job.error is None
        assert (job.run_dir / "metrics.jsonl").is_file()
        assert (job.run_dir / "last.safetensors").is_file()
        assert (job.run_dir / "config.yaml").is_file()
        assert job.config["out"] == str(job.run_dir) and job.device == "cpu"
        assert jobs.read_progress(job).get("state") == "done"
        assert "epoch 1/1" in jobs.log_tail(job)
    first, second = sorted(done, key=lambda j: j.started or 0)
    assert first.started and first.finished and second.started and second.finished
    assert first.finished <= second.started  # never two trainings at once on one device
    # one worker ran both, and left when the queue was empty
    log = jobs.worker_log_path(root, "cpu").read_text()
    assert log.count("cpu worker (pid") == 1 and "queue empty" in log
    # finished jobs are ordinary runs for the checkpoint pickers
    assert {r.path for r in list_runs(root)} == {j.run_dir for j in done}


def test_state_survives_a_restart(finished: tuple[Path, list[jobs.Job]]) -> None:
    root, done = finished
    out = subprocess.run(
        [sys.executable, "-m", "das_core", "jobs", "list", "--runs-root", str(root), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    listed = json.loads(out.stdout)
    assert [j["id"] for j in listed] == [j.id for j in jobs.list_jobs(root)]  # newest first
    assert {j["id"]: j["state"] for j in listed} == {j.id: "done" for j in done}
    assert {j["name"] for j in listed} == {"seed 1", "seed 2"}


def test_cancel_running_and_queued(root: Path) -> None:
    long_job = jobs.submit(TrainConfig.from_mapping(LONG), runs_root=root)
    queued = jobs.submit(TrainConfig.from_mapping(QUICK), runs_root=root)
    running = wait_state(root, long_job, ("running",), timeout=30)
    assert running.pid is not None and jobs._is_training_process(running)
    assert jobs.get_job(queued.id, root).state == "queued"

    assert jobs.cancel(queued.id, root) == "cancelled"  # queued: at once
    assert jobs.cancel(running.run_dir, root) == "running"  # running: the worker kills it
    assert (running.run_dir / "cancel").is_file()
    cancelled = wait_state(root, long_job, ("cancelled", "failed", "done"), timeout=30)
    assert cancelled.state == "cancelled" and cancelled.error is None
    assert running.pid is not None
    wait_for(lambda: jobs._proc_status(running.pid or 0) == "gone", 10, "the training process to go")
    wait_worker_gone(root)
    never = jobs.get_job(queued.id, root)
    assert never.state == "cancelled" and never.started is None
    assert not (never.run_dir / "train.log").exists()
    assert jobs.cancel(queued.id, root) == "cancelled"  # cancelling again changes nothing
    with pytest.raises(jobs.JobError, match="no job"):
        jobs.cancel("no-such-job", root)


def test_killed_training_is_failed_with_the_log_tail(root: Path) -> None:
    job = jobs.submit(TrainConfig.from_mapping(LONG), runs_root=root)
    running = wait_state(root, job, ("running",), timeout=30)
    wait_for(lambda: "training triplet" in jobs.log_tail(running), 60, "training to start")
    assert running.pid is not None
    os.killpg(running.pid, signal.SIGKILL)
    failed = wait_state(root, job, ("failed", "done", "cancelled"), timeout=30)
    assert failed.state == "failed" and failed.returncode == -signal.SIGKILL
    assert failed.error is not None
    assert failed.error.startswith("the training process was killed by SIGKILL")
    assert "training triplet on digits" in failed.error  # the log tail
    wait_worker_gone(root)


def test_failing_training_reports_its_error_line(root: Path) -> None:
    cfg = TrainConfig.from_mapping({**TINY, "dataset": "folder", "data_root": str(root / "missing")})
    job = jobs.submit(cfg, runs_root=root)
    failed = wait_state(root, job, ("failed", "done", "cancelled"), timeout=60)
    assert failed.state == "failed" and failed.returncode == 2
    assert failed.error is not None
    first = failed.error.splitlines()[0]
    assert "data root" in first and "does not exist" in first and not first.startswith("error:")
    assert "error: image folder" in failed.error  # and the log tail below it
    wait_worker_gone(root)


def test_dead_or_reused_pid_is_reconciled_on_read(root: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def fake(name: str, pid: int, extra: dict[str, Any] | None = None) -> jobs.Job:
        run_dir = root / name
        run_dir.mkdir(parents=True)
        (run_dir / "train.log").write_text("step 1\nstep 2 -- last words\n")
        for fname, content in (extra or {}).items():
            (run_dir / fname).write_text(json.dumps(content))
        job = jobs.Job(id=name, run_dir=run_dir, device="cpu", state="running", created=time.time(), started=time.time(), pid=pid)
        jobs._write_job(job)
        return job

    gone = fake("a-gone", dead.pid)
    reused = fake("b-reused", os.getpid())  # alive, but not a training of this run
    finished = fake("c-finished", dead.pid, {"progress.json": {"state": "done"}, "summary.json": {}})
    listed = {j.id: j for j in jobs.list_jobs(root)}
    for job in (gone, reused):
        assert listed[job.id].state == "failed"
        error = listed[job.id].error or ""
        assert error.startswith("the training process died") and "last words" in error
        assert jobs.get_job(job.id, root).state == "failed"  # written back
    assert listed[finished.id].state == "done"
    assert jobs.worker_pid(root, "cpu") is None  # nothing queued: no worker started


def test_bad_config_is_refused_before_anything_is_written(root: Path) -> None:
    bad = dataclasses.replace(TrainConfig.from_mapping(TINY), batch_size=7)
    with pytest.raises(ConfigError, match="batch_size"):
        jobs.submit(bad, runs_root=root)
    with pytest.raises(ConfigError, match="unknown option"):
        jobs.submit({**TINY, "epochz": 3}, runs_root=root)
    with pytest.raises(ConfigError, match="device"):
        jobs.submit(TrainConfig.from_mapping(TINY), runs_root=root, device="tpu")
    assert not root.exists()


def test_worker_lock_allows_one_worker_per_device(root: Path) -> None:
    fd = jobs._try_lock(jobs._worker_lock(root, "cpu"))
    assert fd is not None
    try:
        assert jobs._try_lock(jobs._worker_lock(root, "cpu")) is None
        assert jobs.ensure_worker("cpu", root) is False  # "a worker is alive": none started
        assert jobs.run_worker("cpu", root) == 0  # a second worker leaves at once
    finally:
        os.close(fd)
    # with no job queued a started worker finds the queue empty and exits, freeing the lock
    assert jobs.ensure_worker("cpu", root) is True
    wait_for(lambda: "queue empty" in jobs.worker_log_path(root, "cpu").read_text(), 30, "the worker to exit")
    wait_for(lambda: lock_is_free(root), 10, "the worker lock to be free")


def lock_is_free(root: Path) -> bool:
    fd = jobs._try_lock(jobs._worker_lock(root, "cpu"))
    if fd is None:
        return False
    os.close(fd)
    return True


def test_cli_reports_user_errors(root: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "das_core", "jobs", "cancel", "nope", "--runs-root", str(root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2 and out.stderr.startswith("error: no job 'nope'")


def test_no_lost_wakeup_in_either_order(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's "queue empty, I leave" and a submit's "is a worker there?" are serialised by
    the queue lock, so whichever comes first, the job is run (no process is started here)."""
    # The worker looks first: it finds nothing and frees its lock before the queue lock, so
    # the submit that follows sees no worker and starts one.
    fd = jobs._try_lock(jobs._worker_lock(root, "cpu"))
    assert fd is not None
    assert jobs.Worker("cpu", root, fd)._take_next() is None
    assert lock_is_free(root)
    # The submit comes first: a worker holds the lock, so none is started, and the worker's
    # next look at the queue takes the job.
    fd = jobs._try_lock(jobs._worker_lock(root, "cpu"))
    assert fd is not None
    worker = jobs.Worker("cpu", root, fd)
    monkeypatch.setattr(jobs.Worker, "_start", lambda self, job: job.id)
    job = jobs.submit(TrainConfig.from_mapping(TINY), runs_root=root)
    assert not jobs.worker_log_path(root, "cpu").exists()  # no second worker
    taken = worker._take_next()
    assert taken is not None and taken[0].id == job.id
    worker._release()
    assert jobs.cancel(job.id, root) == "cancelled"
