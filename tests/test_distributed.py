"""DDP on the CPU with the gloo backend and 2 processes (torchrun)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import QUICK_DIGITS, REPO

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from ddp_check import setup, train_steps

    from das_core.distributed import DistContext

    proc = _torchrun([str(REPO / "tests" / "ddp_check.py"), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # every rank holds the same DAS state (frequency recorder, banks, pointers) ...
    for k in r0["das"]:
        assert torch.equal(r0["das"][k], r1["das"][k]), k
    assert r0["losses"] == r1["losses"]
    # ... and the same as one process fed the whole global batch, with the same loss and,
    # after three SGD steps, the same weights (so the gradient scale is right)
    model, crit, opt, x, y = setup()
    single = train_steps(model, crit, opt, x, y, DistContext())
    # (float sums run in another order across two processes: equal to ~1e-5)
    assert r0["losses"] == pytest.approx(single, rel=1e-4, abs=1e-6)
    for k, v in crit.das.state_dict().items():
        assert torch.allclose(r0["das"][k].float(), v.float(), atol=1e-5), k
    for k, v in model.state_dict().items():
        assert torch.allclose(r0["model"][k], v, atol=1e-4), k


def test_torchrun_trains_and_only_rank_0_writes(tmp_path: Path) -> None:
    from das_core.checkpoint import load_checkpoint
    from das_core.io import read_jsonl

    out = tmp_path / "run"
    args = [a for a in QUICK_DIGITS if a != "--no-progress"]
    proc = _torchrun(["-m", "das_core", "train", *args, "--das", "--steps-per-epoch", "6", "--out", str(out),
                      "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 of 2" in proc.stdout + proc.stderr
    assert len(read_jsonl(out / "metrics.jsonl")) == 1  # one epoch, written once
    ckpt = load_checkpoint(out)
    assert ckpt.has_das and ckpt.epoch == 1
    # a global batch of 2 x 50: every step fed DAS 100 real embeddings of the 5 classes
    assert ckpt.build_das().frequency.sum().item() == 6 * 2 * 50 * ckpt.config.das_topk  # type: ignore[union-attr]
