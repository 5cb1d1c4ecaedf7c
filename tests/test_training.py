"""End-to-end training through the CLI on scikit-learn's digits (seconds on CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import QUICK_DIGITS, REPO
from das_core.cli import main
from das_core.store.checkpoint import load_checkpoint
from das_core.store.io import read_jsonl

pytestmark = pytest.mark.slow


def _train(out: Path, *extra: str) -> int:
    return main(["train", *QUICK_DIGITS, "--out", str(out), *extra])


def test_digits_run_is_loadable_and_scores_well_above_chance(digits_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = load_checkpoint(digits_run)
    assert ckpt.path.name == "best.safetensors"  # a validation split exists, so a selected model
    assert ckpt.dataset == "digits" and ckpt.class_names == ["0", "1", "2", "3", "4"]
    assert ckpt.has_das and ckpt.build_das() is not None
    assert main(["evaluate", str(digits_run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    # 5 unseen test classes: chance R@1 is ~0.2 and chance NMI ~0.
    assert metrics["R@1"] > 0.7
    assert metrics["NMI"] > 0.1
    history = read_jsonl(digits_run / "metrics.jsonl")
    assert [r["epoch"] for r in history] == [1, 2]
    assert all("val" in r and "test" in r for r in history)
    summary = json.loads((digits_run / "summary.json").read_text())
    assert summary["selected_epoch"] in (1, 2) and summary["last_epoch"] == 2


def test_same_seed_same_metrics(tmp_path: Path) -> None:
    assert _train(tmp_path / "a", "--das", "--seed", "5") == 0
    assert _train(tmp_path / "b", "--das", "--seed", "5") == 0
    a = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["test"] for r in a] == [r["test"] for r in b]
    assert a[0]["train_loss"] == b[0]["train_loss"]
    wa = load_checkpoint(tmp_path / "a").state("model")
    wb = load_checkpoint(tmp_path / "b").state("model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    args = ["--das", "--seed", "2", "--epochs", "3"]
    assert _train(tmp_path / "full", *args) == 0
    assert _train(tmp_path / "part", "--das", "--seed", "2", "--epochs", "1") == 0
    assert main(["train", "--resume", "--out", str(tmp_path / "part"), "--epochs", "3", "--no-progress"]) == 0
    full = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    part = read_jsonl(tmp_path / "part" / "metrics.jsonl")
    assert [r["epoch"] for r in part] == [1, 2, 3]
    assert [r["test"] for r in part] == [r["test"] for r in full]
    das_a = load_checkpoint(tmp_path / "full").state("criterion.das")
    das_b = load_checkpoint(tmp_path / "part").state("criterion.das")
    assert all(torch.equal(das_a[k], das_b[k]) for k in das_a)


def test_existing_run_is_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(tmp_path / "r") == 0
    before = (tmp_path / "r" / "last.safetensors").read_bytes()
    assert _train(tmp_path / "r") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "r" / "last.safetensors").read_bytes() == before


def test_bad_values_are_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *QUICK_DIGITS, "--out", str(tmp_path / "x"), "--das-r-s", "1.5"]) == 2
    assert "das_r_s=1.5" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # 5 training classes cannot fill a batch of 6 classes x 10
    assert main(["train", *QUICK_DIGITS, "--out", str(tmp_path / "y"), "--batch-size", "60"]) == 2
    err = capsys.readouterr().err
    assert "needs 6 classes" in err and "only 5" in err
    assert not (tmp_path / "y").exists()
    assert main(["train", *QUICK_DIGITS, "--dataset", "cub200", "--data-root", str(tmp_path / "none")]) == 2
    assert "CUB-200-2011" in capsys.readouterr().err


def test_unwritable_output_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() == 0:
        # root ignores permission bits: use a path under a regular file instead
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        out = tmp_path / "ro" / "run"
    assert _train(out) == 2
    assert "cannot write to the run folder" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _train(tmp_path / "r", "--epochs", "1") == 0
    good = (tmp_path / "r" / "last.safetensors").read_bytes()
    from das_core.training import losses

    original = losses.Criterion.forward
    calls = {"n": 0}

    def poisoned(self: losses.Criterion, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        out = original(self, emb, labels)
        return out * float("nan") if calls["n"] >= 4 else out

    monkeypatch.setattr(losses.Criterion, "forward", poisoned)
    assert main(["train", "--resume", "--out", str(tmp_path / "r"), "--epochs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not finite" in err and "epoch 2, step 4" in err
    assert (tmp_path / "r" / "last.safetensors").read_bytes() == good
    assert [r["epoch"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl")] == [1]


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_metrics(tmp_path: Path) -> None:
    """Kill -9 a real training process in the middle of an epoch; nothing saved is torn and
    --resume ends with exactly the metrics of a run that was never interrupted."""
    common = [*QUICK_DIGITS[:-1], "--seed", "4", "--das", "--steps-per-epoch", "40", "--epochs", "3"]
    # Every run in a fresh process with the same thread count: CPU float reductions (hence the
    # exact metrics) depend on it, and this test process's state is not the CLI's.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    cli = [sys.executable, "-m", "das_core", "train"]
    subprocess.run([*cli, *common, "--no-progress", "--out", str(tmp_path / "ref")], env=env, check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cli, *common, "--no-progress", "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        # wait until epoch 1 is saved and epoch 2 is under way, then kill without warning
        # (training writes progress.json at each epoch's first step, then once a second: epoch 2
        # shows up mid-way however fast the machine; polled every 10 ms)
        while time.time() < deadline:
            prog = out / "progress.json"
            if (out / "train_state.safetensors").exists() and prog.exists():
                try:
                    p = json.loads(prog.read_text())
                except json.JSONDecodeError:
                    p = {}
                if p.get("epoch") == 2 and 0 < p.get("step", 0) < 40:
                    break
            if proc.poll() is not None:
                pytest.fail("training ended before it could be killed")
            time.sleep(0.01)
        else:
            pytest.fail("training never reached epoch 2")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert load_checkpoint(out).epoch >= 1  # the last checkpoint is intact
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # no torn line
    subprocess.run([*cli, "--resume", "--out", str(out), "--no-progress"], env=env, check=True, capture_output=True)
    ref = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    got = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in got] == [1, 2, 3]
    assert [r["test"] for r in got] == [r["test"] for r in ref]
