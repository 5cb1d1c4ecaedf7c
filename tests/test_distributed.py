"""DDP on the CPU with the gloo backend and 2 processes (torchrun)."""

from __future__ import annotations

import copy
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

    from das_core.training.distributed import DistContext

    proc = _torchrun([str(REPO / "tests" / "ddp_check.py"), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # every rank holds the same DAS state (frequency recorder, banks, pointers) ...
    for k in r0["das"]:
        assert torch.equal(r0["das"][k], r1["das"][k]), k
    assert r0["losses"] == r1["losses"]
    model, crit, opt, x, y = setup()
    # The banks and counts on rank 0 are exactly those that DAS builds from the gathered global
    # batches it saw (bit for bit: the same float32 arithmetic on the same inputs) ...
    replay = copy.deepcopy(crit.das)
    replay.reset_state()
    for emb, labels in r0["seen"]:
        assert torch.equal(labels, y)  # every step saw the whole global batch, in rank order
        replay.update(emb, labels)
    for k, v in replay.state_dict().items():
        assert torch.equal(r0["das"][k], v), k
    # ... and the global batches equal those of one process fed the whole batch, with the same
    # loss and, after three SGD steps, the same weights (so the gradient scale is right).
    # Tolerances: everything runs in float64 (ddp_check.setup); the two runs differ only in the
    # order of float sums (gradient all-reduce, per-rank batch splits), each reordering moving a
    # result by a few ulps (~1e-16 relative), and three SGD steps of a small CNN amplify that by
    # far less than 1e6. So 1e-10 leaves a margin of > 1e4 on both sides: a wrong gradient scale
    # or a rank's half missing from the batch moves these values by > 1e-3.
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    single = train_steps(model, crit, opt, x, y, DistContext(), seen=seen)
    assert r0["losses"] == pytest.approx(single, rel=1e-10, abs=1e-12)
    for (e_dist, _), (e_one, _) in zip(r0["seen"], seen, strict=True):
        assert torch.allclose(e_dist, e_one, rtol=0, atol=1e-10)
    # DAS stores its state in float32: the float64 embeddings above agree to 1e-10, so their
    # float32 roundings are equal or one ulp apart (|v| <= 1: ulp <= 2**-23), and a bank row
    # v_i - v_j (|.| <= 2) then differs by at most 2 ulps of the operands plus one rounding of
    # the difference: <= 3 * 2**-23 < 4e-7. The counts are integers, exact unless a top-k tie
    # falls within 1e-10, which random float64 inputs do not produce.
    for k, v in crit.das.state_dict().items():
        if k == "bank":
            assert torch.allclose(r0["das"][k], v, rtol=0, atol=4e-7), k
        else:
            assert torch.equal(r0["das"][k], v), k
    for k, v in model.state_dict().items():
        assert torch.allclose(r0["model"][k], v, rtol=0, atol=1e-10), k


def test_torchrun_trains_and_only_rank_0_writes(tmp_path: Path) -> None:
    from das_core.store.checkpoint import load_checkpoint
    from das_core.store.io import read_jsonl

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
