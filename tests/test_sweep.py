"""Sweeps with Optuna (issue 13, item 4): the search-space syntax and its checks, a two-trial
sweep on digits that leaves a SQLite study with two finished trials, two processes adding
trials to one study, and a sweep launched through the job queue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from das_core.cli import main
from das_core.store import jobs, sweeps
from das_core.training.config import ConfigError, TrainConfig
from das_core.training.sweep import Param, build_sweep, metric_value, parse_param

REPO = Path(__file__).resolve().parent.parent
# Tiny digits trials: 1 epoch of 3 steps of a 16-d small CNN, with a validation split to score on.
TINY = [
    "--dataset", "digits", "--backbone", "small-cnn", "--embedding-dim", "16", "--batch-size", "50",
    "--samples-per-class", "10", "--epochs", "1", "--steps-per-epoch", "3", "--device", "cpu",
    "--das", "--val-fraction", "0.2",
]  # fmt: skip
BASE = TrainConfig.from_mapping({
    "dataset": "digits", "backbone": "small-cnn", "embedding_dim": 16, "batch_size": 50, "samples_per_class": 10,
    "epochs": 1, "steps_per_epoch": 3, "device": "cpu", "das": True, "val_fraction": 0.2,
})  # fmt: skip


def study_of(folder: Path) -> optuna.Study:
    """The study read back with Optuna's own reader, straight from the SQLite file."""
    return optuna.load_study(study_name="sweep", storage=f"sqlite:///{folder / 'study.db'}")


# -- the search space ----------------------------------------------------------------------------


def test_param_syntax_ranges_values_and_the_papers_symbols() -> None:
    assert parse_param("r_s=0.001:0.3") == Param("das_r_s", "float", low=0.001, high=0.3)
    assert parse_param("r_b=0.001:1:log") == Param("das_r_b", "float", low=0.001, high=1.0, log=True)
    assert parse_param("T=1,3,5") == Param("das_num_produce", "int", values=(1, 3, 5))
    assert parse_param("K=2:8").ends() == (2, 8)
    assert parse_param("loss=triplet,margin").values == ("triplet", "margin")
    assert parse_param("das-detach=true,false").values == (True, False)
    for text in ("r_s=0.001:0.3", "r_b=0.001:1:log", "T=1,3,5", "das_r_b=0,0.5"):
        p = parse_param(text)
        assert parse_param(p.spec()) == p  # sweep.json stores the specs: they must round-trip


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("r_s", "write NAME=LOW:HIGH"),
        ("gamma=0:1", "unknown option"),
        ("out=a,b", "sets each trial's run folder"),
        ("r_s=0.3:0.1", "low end must be below"),
        ("r_s=0:1:log", "log-scale range needs a low end above 0"),
        ("r_s=0.1:0.2:lin", "LOW:HIGH or LOW:HIGH:log"),
        ("T=one,two", "is not a whole number"),
        ("loss=triplet:margin", "give its values"),
        ("r_b=0.1,0.1", "listed twice"),
    ],
)
def test_bad_param_texts_are_refused_with_the_problem(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_param(text)


@pytest.mark.parametrize(
    ("params", "kwargs", "base", "says"),
    [
        (["r_s=0.01:0.3"], {"sampler": "grid"}, {}, "grid sampler takes explicit values"),
        (["r_s=0:0.3"], {}, {}, "r_s.*must be > 0"),  # the config's own rule for r_s, named
        (["K=4,64"], {}, {}, "must be <= embedding_dim=16"),
        (["r_b=0,1"], {}, {"das": False}, "acts only with DAS on"),
        (["r_b=0,1"], {}, {"val_fraction": 0.0}, "needs a validation split"),
        (["r_b=0,1"], {"metric": "val.R@3"}, {}, "SPLIT.METRIC"),
        (["r_b=0,1", "das_r_b=0.5"], {}, {}, "searched twice"),
        (["r_b=0,1"], {"n_trials": 0}, {}, "between 1 and"),
        (["batch_size=20,50", "samples_per_class=10,25"], {}, {}, "combination is impossible"),
    ],
)
def test_impossible_sweeps_are_refused_before_any_work(
    params: list[str], kwargs: dict[str, object], base: dict[str, object], says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        build_sweep(BASE.replace(**base) if base else BASE, params, **kwargs)  # type: ignore[arg-type]


def test_targets_and_the_saved_form_round_trip() -> None:
    grid = build_sweep(BASE, ["r_s=0.01,0.1", "r_b=0,0.5,1"], sampler="grid")
    assert grid.grid_size() == 6 and grid.target() == 6
    assert grid.with_trials(4).target() == 4 and grid.with_trials(100).target() == 6
    tpe = build_sweep(BASE, ["r_s=0.001:0.3"], metric="test.MAP@R")
    assert tpe.target() == 20
    again = type(tpe).from_dict(json.loads(json.dumps(tpe.to_dict())))
    assert again == tpe
    assert metric_value({"last": {"val": {"R@1": 0.5}, "test": {"MAP@R": 0.25}}}, "test.MAP@R") == 0.25
    assert metric_value({"last": {"val": {"R@1": 0.5}}}, "test.R@1") is None


def test_the_command_line_shown_in_the_app_builds_the_same_sweep() -> None:
    import shlex

    from das_core.cli import build_parser, resolve_train_config
    from das_core.explorer.sweep_view import cli_command

    sweep = build_sweep(BASE, ["r_s=0.001:0.3", "r_b=0.001:1:log", "T=1,3"], n_trials=7, metric="val.MAP@R")
    argv = shlex.split(cli_command(sweep))[3:]  # after "python -m das_core"
    args = build_parser().parse_args(argv)
    again = build_sweep(resolve_train_config(args), args.params, sampler=args.sampler, n_trials=args.trials,
                        metric=args.metric)
    assert again == sweep


def test_trial_points_split_finished_trials_from_the_others_and_find_the_best(tmp_path: Path) -> None:
    from das_core.explorer.sweep_view import trial_points

    sweep = build_sweep(BASE, ["r_s=0.01,0.1", "r_b=0,1"], sampler="grid", direction="minimize")
    rows = [
        sweeps.TrialRow(0, "complete", {"r_s": 0.01, "r_b": 0.0}, 0.5, tmp_path / "trial-0000"),
        sweeps.TrialRow(1, "complete", {"r_s": 0.1, "r_b": 1.0}, 0.25, tmp_path / "trial-0001"),
        sweeps.TrialRow(2, "failed", {"r_s": 0.1, "r_b": 0.0}, None, tmp_path / "trial-0002"),
        sweeps.TrialRow(3, "running", {}, None, tmp_path / "trial-0003"),  # asked, nothing suggested yet
    ]
    view = sweeps.SweepView(tmp_path, sweep, rows)
    pts = trial_points(view, "r_s", "r_b")
    assert pts.done == [(0, 0.01, 0.0, 0.5), (1, 0.1, 1.0, 0.25)]
    assert [o[0] for o in pts.others] == [2, 3]
    assert pts.best == (1, 0.1, 1.0, 0.25)  # minimize: the lower value
    assert not pts.gridded  # two finished trials cannot carry a contour
    one = trial_points(view, "r_b", None)
    assert one.y is None and [d[2] for d in one.done] == [None, None]
    with pytest.raises(KeyError, match="not searched"):
        trial_points(view, "T", None)


# -- running --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_trial_sweep_on_digits_leaves_a_sqlite_study_with_two_finished_trials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep1"
    argv = ["sweep", *TINY, "--param", "r_s=0.01,0.2", "--param", "r_b=0.05", "--sampler", "grid",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "best: trial" in capsys.readouterr().out
    study = study_of(out)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert sorted(t.params["r_s"] for t in trials) == [0.01, 0.2] and {t.params["r_b"] for t in trials} == {0.05}
    for t in trials:  # each trial an ordinary run folder, scored by its own summary.json
        run = out / t.user_attrs["run_dir"]
        summary = json.loads((run / "summary.json").read_text())
        assert t.value == summary["last"]["val"]["R@1"]
        assert (run / "best.safetensors").is_file()
        cfg = TrainConfig.from_mapping(__import__("yaml").safe_load((run / "config.yaml").read_text()))
        assert (cfg.das_r_s, cfg.das_r_b, cfg.out) == (t.params["r_s"], 0.05, str(run))
    best = json.loads((out / "summary.json").read_text())["best"]
    assert best["trial"] == study.best_trial.number and best["value"] == study.best_value

    view = sweeps.load_sweep(out)
    assert view.finished and view.best is not None and view.best.number == study.best_trial.number
    assert [label for label, _ in sweeps.trial_checkpoints(tmp_path)] == [
        "sweep · sweep1 · trial-0000", "sweep · sweep1 · trial-0001"]

    # Resumable: joining with --out alone finds the study full and adds nothing; the same flags
    # join too; a different search space in the same folder is refused.
    assert main(["sweep", "--out", str(out), "--no-progress"]) == 0
    assert main(argv) == 0
    assert len(study_of(out).get_trials()) == 2
    assert main(["sweep", *TINY, "--param", "r_s=0.01,0.3", "--sampler", "grid", "--out", str(out)]) == 2
    assert "holds another sweep (differs in params)" in capsys.readouterr().err
    assert main(["sweep", "--out", str(out), "--lr", "0.1"]) == 2
    assert "uses its saved settings" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_add_trials_to_one_study(tmp_path: Path) -> None:
    """Two workers started together on one sweep folder: one study, four finished trials, two
    from each (``--worker-trials 2`` caps each process, so neither can take all four)."""
    out = tmp_path / "shared"
    cmd = [sys.executable, "-m", "das_core", "sweep", *TINY, "--param", "r_s=0.01:0.3", "--param", "r_b=0:1",
           "--trials", "4", "--worker-trials", "2", "--no-progress", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    logs = [p.communicate(timeout=400)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    trials = study_of(out).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4, logs
    workers = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials}
    assert workers == {str(p.pid) for p in procs}
    assert sorted(t.user_attrs["run_dir"] for t in trials) == [f"trial-{n:04d}" for n in range(4)]


@pytest.mark.slow
def test_a_sweep_launched_through_the_job_queue_runs_to_the_end(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    sweep = build_sweep(BASE, ["r_s=0.05", "r_b=0.01,0.5"], sampler="grid")
    job = sweeps.submit_sweep(sweep, runs_root=root, device="cpu", name="queued sweep")
    assert job.kind == "sweep" and sweeps.is_sweep(job.run_dir)
    assert sweeps.find_sweeps(root) == [job.run_dir]
    deadline = time.monotonic() + 400
    while (current := jobs.get_job(job.id, root)).active and time.monotonic() < deadline:
        time.sleep(0.5)
    assert current.state == "done", jobs.log_tail(current)
    assert "python" not in (current.error or "")
    trials = study_of(job.run_dir).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert sweeps.read_progress(job.run_dir)["state"] == "done"
    view = sweeps.load_sweep(job.run_dir)
    assert view.best is not None and view.best.checkpoint is not None
    assert jobs.read_job(job.run_dir) is not None and jobs.read_job(job.run_dir).kind == "sweep"  # type: ignore[union-attr]


@pytest.mark.slow
def test_a_resumed_sweep_fails_the_trial_of_a_dead_worker_at_once(tmp_path: Path) -> None:
    """A worker killed mid-trial leaves it RUNNING in the study. Resuming on the same machine
    marks it failed at once (its pid is gone) instead of counting it as in progress, and runs
    the trials still missing."""
    import socket

    from das_core.training.sweep import run_sweep

    out = tmp_path / "killed"
    sweep = build_sweep(BASE, ["r_s=0.05", "r_b=0.01,0.5"], sampler="grid")
    sweeps.prepare_sweep_folder(out, sweep)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    orphan = sweeps.open_study(out, sweep).ask()
    orphan.set_user_attr("worker", f"{socket.gethostname()}:{int(dead.stdout)}")  # that process has exited
    started = time.monotonic()
    run_sweep(sweep, out)
    states = [t.state for t in study_of(out).get_trials()]
    assert states == [optuna.trial.TrialState.FAIL] + [optuna.trial.TrialState.COMPLETE] * 2
    assert time.monotonic() - started < sweeps.GRACE  # not left to the heartbeat's grace period


@pytest.mark.slow
def test_cancelling_a_sweep_job_records_its_running_trial_as_failed(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    long = BASE.replace(epochs=1000, steps_per_epoch=100000)  # runs until cancelled
    job = sweeps.submit_sweep(build_sweep(long, ["r_s=0.05,0.1"], sampler="grid"), runs_root=root, device="cpu")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        view = sweeps.load_sweep(job.run_dir)
        if any(t.state == "running" for t in view.trials):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"no trial started: {jobs.log_tail(jobs.get_job(job.id, root))}")
    assert jobs.cancel(job.id, root, grace=20) in ("running", "cancelled")
    while (current := jobs.get_job(job.id, root)).active and time.monotonic() < deadline:
        time.sleep(0.5)
    assert current.state == "cancelled", jobs.log_tail(current)
    # SIGTERM reached the sweep as an interrupt: the study says the trial failed, not running
    states = [t.state for t in study_of(job.run_dir).get_trials()]
    assert states == [optuna.trial.TrialState.FAIL], (states, jobs.log_tail(current))


def test_every_opening_of_the_study_holds_the_sweeps_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening Optuna's SQLite storage may write (tables; the schema's version stamp, even for a
    reader), so a reader opening it while a worker creates the study made the worker fail on its
    own stamp (UNIQUE constraint failed: alembic_version.version_num, a sweep job started while
    its folder was being polled). Every opening, the workers' and the readers', holds the
    sweep's lock: checked at the moment of opening, from a second open file description, which
    an flock held by this process blocks."""
    import fcntl

    folder = tmp_path / "sweep"
    sweep = build_sweep(BASE, ["r_s=0.01,0.1"], sampler="grid")
    sweeps.prepare_sweep_folder(folder, sweep)
    opened: list[str] = []
    real = sweeps._storage

    def checked(sweep_dir: Path, **kw: object) -> object:
        # held: the lock cannot be taken a second time
        with open(Path(sweep_dir) / sweeps.LOCK_FILE, "a+") as fh, pytest.raises(BlockingIOError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        opened.append("reader" if kw.get("reader") else "worker")
        return real(sweep_dir, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(sweeps, "_storage", checked)
    sweeps.open_study(folder, sweep)  # a worker creates the study
    assert sweeps.load_sweep(folder).trials == []  # the app / --show read it
    assert sweeps.fail_trials_of(folder, pid=1) == []  # the job queue closes a dead worker's trials
    assert opened == ["worker", "reader", "worker"]
