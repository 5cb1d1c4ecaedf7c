"""The fine-grained benchmark's scripts (issue 11): the GPU script's whole path run on the CPU
on a tiny file (so the one GPU run cannot fail on a bug), its skip without CUDA, and the
summariser's paired intervals and verdicts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _tiny_file(path: Path) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for side, classes in (("train", 4), ("test", 3)):
        labels = np.repeat(np.arange(classes) + (0 if side == "train" else 10), 3)
        arrays[f"{side}_labels"] = labels
        arrays[f"{side}_images"] = rng.integers(0, 256, (len(labels), 16, 16, 3), dtype=np.uint8)
    np.savez_compressed(path, **arrays)
    return path


def test_gpu_script_skips_without_cuda(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = subprocess.run([sys.executable, str(BENCH / "gpu_finegrained.py"), "--data", "x.npz"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and "no CUDA: skipped" in out.stdout


@pytest.mark.slow
def test_gpu_script_runs_end_to_end_on_cpu(tmp_path: Path) -> None:
    data = _tiny_file(tmp_path / "tiny.npz")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cmd = [sys.executable, str(BENCH / "gpu_finegrained.py"), "--data", str(data), "--allow-cpu",
           "--jobs", "das:0", "das+grad-norm:0", "--epochs", "1", "--batch-size", "4", "--size", "32",
           "--budget-s", "500"]
    env = {"PATH": "/usr/bin:/bin", "OUT": str(out_dir), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    records = json.loads((out_dir / "gpu_finegrained.json").read_text())
    assert sorted(r["variant"] for r in records) == ["das", "das+grad-norm"]
    for r in records:
        assert r["epochs"] == 1 and 0.0 <= r["test"]["R@1"] <= 1.0
        epoch = r["curve"][0]
        assert epoch["weight_norm"]["backbone"] > 0
        assert "share_own_copy" in epoch["das_diagnostics"]
    assert "R@1 per epoch" in done.stdout


def test_summariser_paired_interval_and_verdicts() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        from summarise_finegrained import paired, verdict
    finally:
        sys.path.remove(str(BENCH))
    mean, lo, hi = paired([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, 2) = 4.3027: half-width 4.3027 / sqrt(3) = 2.4841
    assert mean == 2.0 and lo == pytest.approx(2.0 - 2.48414, abs=1e-4) and hi == pytest.approx(4.48414, abs=1e-4)
    assert verdict(0.1, 2.0, 5) == "helps"
    assert verdict(-2.0, -0.1, 5) == "hurts"
    assert verdict(-1.0, 1.0, 5) == "no detectable difference at 5 seeds"
    assert math.isnan(paired([1.0])[1])


def test_why_variants_are_valid_configs_and_controls_differ_only_in_das() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        from bench_das_finegrained import parse_args, recipe
        from finegrained import WHY, tail_config
        from summarise_finegrained import WHY_CONTROL
    finally:
        sys.path.remove(str(BENCH))
    base = recipe(parse_args([]))
    for name, overrides in WHY.items():
        cfg = tail_config(overrides, base)  # TrainConfig refuses an unknown option or a bad value
        assert cfg.das == name.startswith("das"), name
    for treated, control in WHY_CONTROL.items():
        # a DAS variant's own baseline: the same non-DAS options, DAS off
        assert WHY[control]["das"] is False and WHY[treated]["das"] is True
        assert ({k: v for k, v in WHY[treated].items() if not k.startswith("das")}
                == {k: v for k, v in WHY[control].items() if not k.startswith("das")}), treated
