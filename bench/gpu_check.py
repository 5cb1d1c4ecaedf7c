"""Issue 9: every CUDA test and GPU benchmark in one go (under 5 minutes on one H200).

Prints and writes (JSON: ``$OUT/gpu_check.json`` when ``$OUT`` is a folder, ``$OUT`` when it
names a file, else ``bench/results/gpu_check.json``):

1. the CUDA tests (``pytest tests/test_das.py -k cuda``; needs pytest and hypothesis);
2. DAS forward alone, eager and CUDA-graphed: ms per call (CUDA events), CUDA kernels per
   call and GPU busy time per call (torch.profiler), at the paper shape (B = 112, d = 512,
   C = 100, T = 3, K = 4, Z = 10), at C = 11,318 (SOP's classes) and at B = 1024, C = 1000;
   ``torch.compile`` of the module at the paper shape (in a subprocess with a time limit);
3. ResNet-50 (random init), batch 112 (56 x 2), 224 px, bf16 autocast, channels_last,
   multi-similarity loss and miner with DAS (K = 8), fused Adam: forward+backward alone vs
   the full training step (augmentation, DAS, miner, loss, optimiser), their ratio, and
   DAS's share of the step; also the criterion (DAS + miner + loss, forward and backward),
   the criterion without DAS (dense multi-similarity, and PML's miner + loss for reference),
   the optimiser step alone, and the host synchronisations of one step and of one criterion
   call (``torch.cuda.set_sync_debug_mode("warn")`` warnings);
4. the triplet criterion with a batch miner and DAS (semi-hard and distance-weighted, both
   triplet forms): the dense, sync-free path against the index lists, ms and host syncs.

Without CUDA it prints "no CUDA: skipped", writes that and exits 0. A part whose package is
missing (pytest, hypothesis, torchvision, pytorch-metric-learning) is skipped with the
reason; the script exits 1 only when a CUDA test fails or a benchmark raises.
``--cpu-dry-run`` runs every part on the CPU with tiny sizes (a smoke test of this script).

    bench/gpu_check.sh [--quick] [--no-compile] [--no-tests]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from das_core.training.das import DenselyAnchoredSampling  # noqa: E402

PAPER = {"num_classes": 100, "dim": 512, "num_produce": 3, "topk": 4, "bank_size": 10}
DAS_CASES = [
    ("paper B=112 C=100", 112, 100),
    ("SOP classes B=112 C=11318", 112, 11318),
    ("large B=1024 C=1000", 1024, 1000),
]


def out_path() -> Path:
    env = os.environ.get("OUT")
    if env:
        p = Path(env)
        return p / "gpu_check.json" if p.is_dir() or env.endswith("/") else p
    return ROOT / "bench" / "results" / "gpu_check.json"


def missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def count_host_syncs(fn: Callable[[], Any], dev: torch.device) -> int | None:
    """Host synchronisations in one call of ``fn``: the warnings of
    ``torch.cuda.set_sync_debug_mode("warn")`` (``None`` without CUDA)."""
    if dev.type != "cuda":
        return None
    import warnings

    fn()  # warm: first calls may capture CUDA graphs or tune kernels
    torch.cuda.synchronize(dev)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(dev)
    return sum("synchronizing" in str(w.message) for w in caught)


def time_per_call(fn: Callable[[], Any], dev: torch.device, iters: int, warmup: int = 5) -> float:
    """Milliseconds per call: CUDA events around ``iters`` back-to-back calls (the host runs
    ahead, so a launch-bound function shows its launch cost), median of 3 such runs."""
    for _ in range(warmup):
        fn()
    sync(dev)
    runs = []
    for _ in range(3):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize(dev)
            runs.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            runs.append((time.perf_counter() - t0) * 1000 / iters)
    return statistics.median(runs)


def kernel_profile(fn: Callable[[], Any], dev: torch.device, calls: int = 10) -> dict[str, float]:
    """CUDA kernels per call and GPU busy time per call (sum of the kernels' device time), from
    torch.profiler over ``calls`` calls after a warm-up."""
    if dev.type != "cuda":
        return {"kernels_per_call": float("nan"), "gpu_busy_ms_per_call": float("nan")}
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize(dev)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(dev)
    kernels, busy_us = 0, 0.0
    for evt in prof.events():
        if getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA:
            name = evt.name.lower()
            if "memcpy" in name or "memset" in name:
                continue
            kernels += 1
            busy_us += float(getattr(evt, "device_time", 0.0) or getattr(evt, "cuda_time", 0.0) or 0.0)
    return {"kernels_per_call": kernels / calls, "gpu_busy_ms_per_call": busy_us / 1000 / calls}


def das_batches(b: int, c: int, d: int, dev: torch.device, n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(b + c)
    out = []
    for _ in range(n):
        cls = torch.randperm(c, generator=gen)[: b // 2]
        y = cls.repeat_interleave(2)
        x = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=1)
        out.append((x.to(dev).requires_grad_(), y.to(dev)))
    return out


def das_case(name: str, b: int, c: int, dev: torch.device, iters: int) -> dict[str, Any]:
    hp = {**PAPER, "num_classes": c}
    batches = das_batches(b, c, hp["dim"], dev)
    res: dict[str, Any] = {"batch": b, "classes": c, **{k: v for k, v in hp.items() if k != "num_classes"}}
    for mode in ("eager", "graphed"):
        if mode == "graphed" and dev.type != "cuda":
            continue
        torch.manual_seed(0)
        das = DenselyAnchoredSampling(**hp).to(dev)
        das.cuda_graphs = mode == "graphed"
        step = {"i": 0}

        def call(das: DenselyAnchoredSampling = das, step: dict[str, int] = step) -> None:
            x, y = batches[step["i"] % len(batches)]
            step["i"] += 1
            das(x, y)

        ms = time_per_call(call, dev, iters)
        prof = kernel_profile(call, dev)
        res[mode] = {"ms": ms, **prof}
        if mode == "graphed":
            res[mode]["captured"] = len(das._graphs) > 0 and das._graphs.captured(das._graph_key(batches[0][0]))
        print(
            f"  DAS {name:28s} {mode:8s} {ms:7.3f} ms/call  kernels/call {prof['kernels_per_call']:6.1f}  "
            f"GPU busy {prof['gpu_busy_ms_per_call']:.3f} ms/call"
        )
    return res


COMPILE_SNIPPET = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from das_core.training.das import DenselyAnchoredSampling
dev = torch.device("cuda")
das = DenselyAnchoredSampling(100, 512).to(dev)
das.cuda_graphs = False
fn = torch.compile(das)
gen = torch.Generator().manual_seed(0)
xs = [(torch.nn.functional.normalize(torch.randn(112, 512, generator=gen), dim=1).to(dev).requires_grad_(),
       torch.randperm(100, generator=gen)[:56].repeat_interleave(2).to(dev)) for _ in range(8)]
t0 = time.perf_counter()
for i in range(3):
    fn(*xs[i % 8])
torch.cuda.synchronize()
compile_s = time.perf_counter() - t0
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for i in range(200):
    fn(*xs[i % 8])
end.record()
torch.cuda.synchronize()
print(json.dumps({"ms": start.elapsed_time(end) / 200, "compile_s": compile_s}))
"""


def compile_case(timeout: float) -> dict[str, Any]:
    if missing("triton"):
        return {"skipped": "triton is not installed"}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", COMPILE_SNIPPET, str(ROOT)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"skipped": f"torch.compile took over {timeout:.0f} s"}
    if proc.returncode != 0:  # a comparison only: reported, not a failure of the check
        return {"compile_failed": proc.stderr[-2000:]}
    res: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return res


def run_cuda_tests() -> dict[str, Any]:
    lacking = missing("pytest", "hypothesis")
    if lacking:
        return {"skipped": f"needs {' and '.join(lacking)} (pip install, or put the wheels on PYTHONPATH)"}
    cmd = [sys.executable, "-m", "pytest", "tests/test_das.py", "-k", "cuda", "-q", "-p", "no:cacheprovider", "-rs"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    for line in tail:
        print("  " + line)
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "tail": tail}


@contextlib.contextmanager
def section(results: dict[str, Any], key: str, title: str) -> Iterator[dict[str, Any]]:
    print(f"\n== {title}")
    t0 = time.perf_counter()
    box: dict[str, Any] = {}
    try:
        yield box
    except Exception as err:  # a broken part is reported, the others still run
        traceback.print_exc()
        box["error"] = f"{type(err).__name__}: {err}"
    box["seconds"] = round(time.perf_counter() - t0, 1)
    results[key] = box


def resnet_step(dev: torch.device, steps: int, batch: int = 112, size: int = 224, raw_size: int = 256) -> dict[str, Any]:
    """ResNet-50 forward+backward vs the full training step (see the module docstring)."""
    lacking = missing("torchvision", "pytorch_metric_learning", "PIL")
    if lacking:
        return {"skipped": f"needs {', '.join(lacking)}"}
    from das_core.models import build_model
    from das_core.training.config import TrainConfig
    from das_core.training.losses import build_criterion

    cuda = dev.type == "cuda"
    torch.backends.cudnn.benchmark = True
    cfg = TrainConfig.from_mapping({
        "dataset": "cub200", "backbone": "resnet50", "pretrained": False, "embedding_dim": 512,
        "pooling": "avg+max", "loss": "multi-similarity", "miner": "multi-similarity", "das": True,
        "das_topk": 8, "batch_size": batch, "samples_per_class": 2,
    })
    model = build_model(cfg).to(dev).to(memory_format=torch.channels_last)
    crit = build_criterion(cfg, 100).to(dev)
    params = list(model.parameters()) + list(crit.parameters())
    opt = torch.optim.Adam(params, lr=1e-5, fused=True if cuda else None)  # as das_core.training.loop
    prep = model.preprocessing.with_size(size) if size != 224 else model.preprocessing
    amp = torch.bfloat16 if (not cuda or torch.cuda.is_bf16_supported()) else torch.float16
    raw = torch.randint(0, 256, (batch, 3, raw_size, raw_size), dtype=torch.uint8, device=dev)
    labels = torch.arange(batch // 2, device=dev).repeat_interleave(2)
    x_fixed = prep.train_batch(raw).contiguous(memory_format=torch.channels_last)

    def fwd_bwd() -> None:
        with torch.autocast(dev.type, dtype=amp):
            emb = model(x_fixed)
        emb.float().sum().backward()

    def full_step() -> None:
        x = prep.train_batch(raw).contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=amp):
            emb = model(x)
        loss = crit(emb.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    emb_fixed = torch.nn.functional.normalize(torch.randn(batch, 512, device=dev), dim=1)

    def criterion_only() -> None:
        e = emb_fixed.clone().requires_grad_()
        crit(e, labels).backward()

    def optimiser_only() -> None:
        opt.step()

    assert crit.das is not None
    das = crit.das

    def das_only() -> None:
        das(emb_fixed, labels)

    from das_core.training.losses import Criterion

    plain = Criterion(crit.loss, crit.miner, None)  # the same miner and loss, without DAS

    def criterion_no_das() -> None:
        e = emb_fixed.clone().requires_grad_()
        plain(e, labels).backward()

    t_ref = time_per_call(fwd_bwd, dev, steps)
    t_full = time_per_call(full_step, dev, steps)
    t_crit = time_per_call(criterion_only, dev, steps)
    t_crit_plain = time_per_call(criterion_no_das, dev, steps)
    # The same without DAS on PML's index-list miner and loss (what ran before the dense one).
    dense_ms, plain.dense_ms = plain.dense_ms, None
    t_crit_pml = time_per_call(criterion_no_das, dev, steps)
    plain.dense_ms = dense_ms
    syncs_step, syncs_crit = count_host_syncs(full_step, dev), count_host_syncs(criterion_only, dev)
    t_opt = time_per_call(optimiser_only, dev, steps)
    t_das = time_per_call(das_only, dev, max(steps, 50))
    res = {
        "batch": batch,
        "image_size": size,
        "amp_dtype": str(amp),
        "ms_forward_backward": t_ref,
        "ms_full_step": t_full,
        "ratio_full_step_over_forward_backward": t_ref / t_full,
        "ms_das_forward": t_das,
        "das_share_of_step": t_das / t_full,
        "ms_criterion_fwd_bwd": t_crit,
        "ms_criterion_fwd_bwd_no_das": t_crit_plain,
        "ms_criterion_fwd_bwd_no_das_pml": t_crit_pml,
        "dense_multi_similarity": dense_ms is not None,
        "host_syncs_per_step": syncs_step,
        "host_syncs_per_criterion": syncs_crit,
        "ms_optimiser_step_fused_adam": t_opt,
        "images_per_s_forward_backward": batch / t_ref * 1000,
        "images_per_s_full_step": batch / t_full * 1000,
        "targets": {"ratio": ">= 0.9", "das_share": "<= 1%"},
    }
    print(
        f"  fwd+bwd {t_ref:.2f} ms, full step {t_full:.2f} ms -> ratio {t_ref / t_full:.3f} (target >= 0.9); "
        f"DAS {t_das:.3f} ms = {100 * t_das / t_full:.2f}% of the step (target <= 1%); "
        f"criterion fwd+bwd {t_crit:.2f} ms; fused Adam step {t_opt:.2f} ms"
    )
    print(
        f"  criterion without DAS {t_crit_plain:.2f} ms (PML's miner + loss: {t_crit_pml:.2f} ms); "
        f"host syncs per step {syncs_step}, per criterion call {syncs_crit}"
    )
    return res


def triplet_criterion(dev: torch.device, iters: int, batch: int = 112, dim: int = 512) -> dict[str, Any]:
    """The triplet criterion with a batch miner and DAS (T = 3) on fixed embeddings, forward and
    backward: the dense, sync-free path (das_core/training/triplet_dense.py) against the index
    lists it replaced (the miner's boolean-indexed triplets into PML's loss), ms per call and
    host synchronisations per call."""
    import das_core.training.losses as losses
    from das_core.training.config import TrainConfig

    labels = torch.arange(batch // 2, device=dev).repeat_interleave(2)
    emb = torch.nn.functional.normalize(torch.randn(batch, dim, device=dev), dim=1)
    res: dict[str, Any] = {}
    for miner, form in (("semi-hard", "plain"), ("distance-weighted", "plain"), ("semi-hard", "squared")):
        cfg = TrainConfig.from_mapping({"loss": "triplet", "miner": miner, "triplet_form": form, "embedding_dim": dim,
                                        "das": True, "das_num_produce": 3})
        crit = losses.build_criterion(cfg, batch // 2).to(dev)

        def call(crit: Any = crit) -> None:
            crit(emb.clone().requires_grad_(), labels).backward()

        row: dict[str, Any] = {}
        saved = losses.DENSE_TRIPLET_ON_CPU
        for name, dense in (("dense", crit.dense_triplet), ("index_lists", None)):
            crit.dense_triplet = dense
            losses.DENSE_TRIPLET_ON_CPU = dense is not None
            row[f"ms_{name}"] = time_per_call(call, dev, iters)
            row[f"host_syncs_{name}"] = count_host_syncs(call, dev)
        losses.DENSE_TRIPLET_ON_CPU = saved
        key = f"{miner} {form}"
        res[key] = row
        print(f"  triplet criterion + DAS, {key}: dense {row['ms_dense']:.2f} ms ({row['host_syncs_dense']} host syncs), "
              f"index lists {row['ms_index_lists']:.2f} ms ({row['host_syncs_index_lists']} host syncs)")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison")
    ap.add_argument("--no-tests", action="store_true", help="skip the CUDA tests")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run every part on the CPU, tiny sizes")
    args = ap.parse_args(argv)
    path = out_path()
    results: dict[str, Any] = {"bench": "gpu_check", "torch": torch.__version__, "python": sys.version.split()[0]}
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("gpu_check: no CUDA: skipped (no CUDA device on this machine)")
        results.update({"skipped": True, "reason": "no CUDA device"})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        return 0
    dev = torch.device("cpu" if args.cpu_dry_run else "cuda")
    results["device"] = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu (dry run)"
    print(f"gpu_check on {results['device']}, torch {torch.__version__}")
    started = time.perf_counter()
    failed = False

    if not args.no_tests and dev.type == "cuda":
        with section(results, "cuda_tests", "CUDA tests") as box:
            box.update(run_cuda_tests())
            failed |= box.get("returncode", 0) != 0

    with section(results, "das_forward", "DAS forward alone") as box:
        iters = 5 if args.cpu_dry_run else (50 if args.quick else 200)
        cases = [("dry run B=16 C=10", 16, 10)] if args.cpu_dry_run else DAS_CASES
        for name, b, c in cases:
            box[name] = das_case(name, b, c, dev, iters)

    if not args.no_compile and dev.type == "cuda":
        with section(results, "das_torch_compile", "DAS forward, torch.compile (paper shape, no CUDA graphs)") as box:
            box.update(compile_case(timeout=100))
            print("  " + json.dumps(box))

    with section(results, "resnet50_step", "ResNet-50 training step, batch 112, bf16, channels_last") as box:
        if args.cpu_dry_run:
            box.update(resnet_step(dev, steps=1, batch=4, size=64, raw_size=72))
        else:
            box.update(resnet_step(dev, steps=10 if args.quick else 30))

    with section(results, "triplet_criterion", "Triplet criterion + DAS, B=112, d=512: dense vs index lists") as box:
        box.update(triplet_criterion(dev, iters=2 if args.cpu_dry_run else 50, batch=16 if args.cpu_dry_run else 112,
                                     dim=32 if args.cpu_dry_run else 512))

    failed |= any("error" in v for v in results.values() if isinstance(v, dict))
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["passed"] = not failed
    paper = results.get("das_forward", {}).get(DAS_CASES[0][0], {})
    step = results.get("resnet50_step", {})
    print("\n== summary")
    if "graphed" in paper:
        print(
            f"  DAS paper shape: eager {paper['eager']['ms']:.3f} ms, graphed {paper['graphed']['ms']:.3f} ms "
            f"(target <= 0.3 ms), {paper['graphed']['kernels_per_call']:.0f} kernels, "
            f"GPU busy {paper['graphed']['gpu_busy_ms_per_call']:.3f} ms"
        )
    if "ratio_full_step_over_forward_backward" in step:
        print(
            f"  ResNet-50 step / fwd+bwd: {step['ratio_full_step_over_forward_backward']:.3f} (target >= 0.9), "
            f"DAS share {100 * step['das_share_of_step']:.2f}% (target <= 1%), "
            f"host syncs per step {step.get('host_syncs_per_step')}"
        )
    print(f"  total {results['total_seconds']} s; {'OK' if not failed else 'SOMETHING FAILED (see above)'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
