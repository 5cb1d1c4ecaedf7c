"""Issue 11 at paper scale on one GPU: full fine-tune of EfficientNet-Lite0 (ImageNet weights)
on emoji-styles, baseline vs DAS and the hypothesis variants, several runs in parallel
processes on one GPU, within a wall-clock budget.

Recipe: Adam lr 1e-4, weight decay 4e-4 (coupled), batch 112 = 56 classes x 2 images, 128-d,
frozen BatchNorm, triplet loss (margin 0.2) + distance-weighted mining, DAS T=3 K=4 Z=10
r_s = r_b = 0.01 with detach; images upsampled on the GPU from the rendered 64-px file to
``--size`` (default 64), RandomResizedCrop(0.08-1) + flip for training, resize x 8/7 + center
crop for testing, bf16 autocast. Every epoch: test R@1 / MAP@R and the weight norms (trunk, its
last layer, embedding layer) and, with DAS, the DAS diagnostics. Each job runs in its own
process; a job stops at the epoch after which another one would miss the budget.

    bench/gpu_finegrained.sh DATA.npz            # FINEGRAINED_BUDGET_S=300 by default
    python3 bench/gpu_finegrained.py --data DATA.npz --budget-s 300 [--jobs baseline:0 das:0 ...]
    python3 bench/gpu_finegrained.py --export data/emoji-styles-gpu.npz   # make the data file (CPU)

DATA: either the file ``--export`` writes (``train_images``, ``train_labels``, ``test_images``,
``test_labels``: the stored class-disjoint split, uint8 64 px, compressed) or the dataset's own
``emoji-styles-64.npz`` (``images``, ``labels``, ``class_keys``) with the split read from
``das_core/data/emoji_styles/split.json``. Records (JSON, one per job, with the per-epoch curve)
are printed and written to ``$OUT/gpu_finegrained.json`` when ``$OUT`` is set (else
``bench/results/gpu_finegrained.json``). Without CUDA it prints "no CUDA: skipped" and exits 0
(``--allow-cpu`` runs it on the CPU, for testing). Imports nothing of the app.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

# 10 processes at once: at 64 px one run alone takes ~2 s an epoch on an H200 (launch-bound, so
# parallel processes overlap well); in ~280 s each gets well past the ~20 epochs after which the
# issue's probe saw DAS fall below the baseline.
DEFAULT_JOBS = (
    "baseline:0", "das:0", "das+wd0:0", "baseline+wd0:0", "das+adamw:0",
    "das+grad-norm:0", "das+exclude-own:0", "das+no-detach:0", "baseline:1", "das:1",
)


def _tqdm_shim() -> None:
    """pytorch-metric-learning imports tqdm for progress bars this script never shows; where
    tqdm is not installed (a bare GPU machine), a do-nothing stand-in lets it import."""
    try:
        import tqdm  # noqa: F401
    except ImportError:
        class _Bar:
            def __init__(self, iterable: Any = None, *a: Any, **k: Any) -> None:
                self.iterable = iterable

            def __iter__(self) -> Any:
                return iter(self.iterable or ())

            def __getattr__(self, name: str) -> Any:
                return lambda *a, **k: None

        import importlib.machinery

        for name in ("tqdm", "tqdm.autonotebook", "tqdm.auto"):
            mod = types.ModuleType(name)
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # torch._dynamo asks find_spec
            mod.tqdm = _Bar  # type: ignore[attr-defined]
            sys.modules[name] = mod


def job_overrides(name: str) -> dict[str, Any]:
    from finegrained import WHY

    if name == "baseline":
        return {"das": False}
    if name == "das":
        return {"das": True}
    if name in WHY:
        return dict(WHY[name])
    raise SystemExit(f"unknown job {name!r}; jobs are baseline, das, {', '.join(WHY)} (as NAME:SEED)")


# -- data -----------------------------------------------------------------------------------------


def load_data(path: Path, limit: int | None = None) -> dict[str, Any]:
    import numpy as np

    z = np.load(path, allow_pickle=False)
    if "train_images" in z.files:
        out = {k: z[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}
    else:
        split = json.loads((ROOT / "das_core" / "data" / "emoji_styles" / "split.json").read_text())
        keys = z["class_keys"][z["labels"]]
        tr, te = np.isin(keys, split["train"]), np.isin(keys, split["test"])
        out = {"train_images": z["images"][tr], "train_labels": z["labels"][tr],
               "test_images": z["images"][te], "test_labels": z["labels"][te]}
    for side in ("train", "test"):
        _, out[f"{side}_labels"] = np.unique(out[f"{side}_labels"], return_inverse=True)
        if limit:
            keep = np.flatnonzero(out[f"{side}_labels"] < limit)  # the first `limit` classes
            out[f"{side}_images"], out[f"{side}_labels"] = out[f"{side}_images"][keep], out[f"{side}_labels"][keep]
    return out


def export(path: Path, dataset: str) -> int:
    """Write the dataset's stored split as one compressed file for the GPU machine."""
    import numpy as np

    from das_core.data import ArrayDataset, load_splits

    splits = load_splits(dataset)
    arrays: dict[str, Any] = {}
    for side, ds in (("train", splits.train), ("test", splits.test)):
        if not isinstance(ds, ArrayDataset):
            raise SystemExit(f"{dataset}: --export needs an in-memory dataset")
        arrays[f"{side}_images"] = ds.images
        arrays[f"{side}_labels"] = np.asarray(ds.labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {len(arrays['train_labels'])} train / "
          f"{len(arrays['test_labels'])} test images")
    return 0


# -- one job (a worker process) -------------------------------------------------------------------


def run_job(name: str, seed: int, args: argparse.Namespace, deadline: float, out_file: Path) -> dict[str, Any]:
    import math

    import torch
    import torch.nn.functional as F
    from finegrained import train_embedding

    from das_core.models import build_model
    from das_core.training.config import TrainConfig

    allow_cpu = args.allow_cpu and not torch.cuda.is_available()
    device = torch.device("cpu" if allow_cpu else "cuda")
    data = load_data(Path(args.data), limit=args.limit_classes)
    cfg = TrainConfig.from_mapping({
        "dataset": "digits", "backbone": "efficientnet-lite0", "pretrained": True, "freeze_bn": True,
        "embedding_dim": 128, "batch_size": args.batch_size, "samples_per_class": 2, "loss": "triplet",
        "miner": "distance-weighted", "optimizer": "adam", "lr": args.lr, "weight_decay": 4e-4,
        "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch, "seed": seed,
        **job_overrides(name),
    })
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    model = build_model(cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    size = args.size
    train_u8 = torch.from_numpy(data["train_images"]).to(device).permute(0, 3, 1, 2).contiguous()
    test_u8 = torch.from_numpy(data["test_images"]).to(device).permute(0, 3, 1, 2).contiguous()

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(127.5).sub_(1.0)  # Lite0 inputs in [-1, 1]

    def train_x(index: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) to ``size`` + horizontal flip, per image,
        as one affine grid sample on the device (torchvision-free)."""
        x = unit(train_u8[index.to(device)])
        b = x.shape[0]
        area = torch.empty(b).uniform_(0.08, 1.0, generator=gen)
        ratio = torch.exp(torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen))
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)
        cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
        grid = F.affine_grid(theta.to(device), [b, 3, size, size], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else out

    @torch.no_grad()
    def embed_test(net: torch.nn.Module) -> tuple[Any, Any]:
        net.eval()
        big = round(size * 8 / 7)
        parts = []
        for s in range(0, len(test_u8), 512):
            x = F.interpolate(unit(test_u8[s : s + 512]), size=(big, big), mode="bilinear", antialias=True)
            o = (big - size) // 2
            x = x[:, :, o : o + size, o : o + size]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                parts.append(net(x).float())
        return torch.cat(parts).cpu().numpy(), data["test_labels"]

    record: dict[str, Any] = {
        "dataset": "emoji-styles", "setting": f"lite0-full-finetune-{size}px", "loss": cfg.loss, "miner": cfg.miner,
        "variant": name, "seed": seed, "r_s": cfg.das_r_s, "r_b": cfg.das_r_b, "lr": cfg.lr,
        "weight_decay": cfg.weight_decay, "optimizer": cfg.optimizer, "das": cfg.das,
        "overrides": job_overrides(name), "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "parallel_jobs": args.parallel, "command": " ".join(sys.argv),
    }

    def save(curve: list[dict[str, Any]]) -> None:
        partial = {**record, "epochs": len(curve), "test": curve[-1]["test"], "curve": curve}
        tmp = out_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(partial))
        tmp.replace(out_file)

    res = train_embedding(cfg, model, train_x, data["train_labels"], embed_test, device=device,
                          autocast=device.type == "cuda", deadline=deadline, on_epoch=save,
                          log=lambda line: print(f"[{name}:{seed}] {line}", flush=True))
    final = {**record, "epochs": len(res["curve"]), "planned_epochs": cfg.epochs, "test": res["test"],
             "curve": res["curve"], "seconds": round(res["seconds"], 1), "stopped_early": res["stopped_early"]}
    out_file.write_text(json.dumps(final))
    return final


# -- the launcher ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="the rendered data file (see above)")
    ap.add_argument("--export", type=Path, help="write the data file from --dataset and exit (CPU)")
    ap.add_argument("--dataset", default="emoji-styles")
    ap.add_argument("--jobs", nargs="+", default=list(DEFAULT_JOBS), help="NAME:SEED, each its own process")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("FINEGRAINED_BUDGET_S", 300)))
    ap.add_argument("--epochs", type=int, default=80, help="at most; the budget usually stops earlier")
    ap.add_argument("--size", type=int, default=64, help="input pixels (upsampled on the GPU from the file)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=112)
    ap.add_argument("--steps-per-epoch", type=int, default=None)
    ap.add_argument("--parallel", type=int, default=0, help="processes at once (default: all jobs)")
    ap.add_argument("--limit-classes", type=int, default=None, help="use only the first N classes (testing)")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no GPU (testing)")
    ap.add_argument("--worker", nargs=3, metavar=("NAME", "SEED", "FILE"), help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _tqdm_shim()
    if args.export:
        return export(args.export, args.dataset)
    if args.worker:
        name, seed, file = args.worker
        run_job(name, int(seed), args, float(args.deadline), Path(file))
        return 0
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no CUDA: skipped")
        return 0
    if not args.data or not Path(args.data).is_file():
        print(f"error: --data must name the rendered data file (got {args.data!r}); make one with --export",
              file=sys.stderr)
        return 2
    for job in args.jobs:  # check every job name before starting anything
        job_overrides(job.split(":")[0])
    started = time.time()
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
    work = out_dir / "gpu_finegrained_jobs"
    work.mkdir(parents=True, exist_ok=True)
    deadline = started + args.budget_s - 20  # leave time to gather and print
    parallel = args.parallel or len(args.jobs)
    threads = max(1, (os.cpu_count() or 2) // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    passthrough = ["--data", str(args.data), "--epochs", str(args.epochs), "--size", str(args.size),
                   "--lr", str(args.lr), "--batch-size", str(args.batch_size), "--parallel", str(parallel)]
    if args.steps_per_epoch:
        passthrough += ["--steps-per-epoch", str(args.steps_per_epoch)]
    if args.limit_classes:
        passthrough += ["--limit-classes", str(args.limit_classes)]
    if args.allow_cpu:
        passthrough.append("--allow-cpu")
    pending = [(j.split(":")[0], int(j.split(":")[1]) if ":" in j else 0) for j in args.jobs]
    running: list[tuple[subprocess.Popen[bytes], Path]] = []
    files: list[Path] = []
    print(f"{len(pending)} jobs, {parallel} at a time, {threads} CPU thread(s) each, budget {args.budget_s:.0f} s",
          flush=True)
    while pending or running:
        while pending and len(running) < parallel and time.time() < deadline - 30:
            name, seed = pending.pop(0)
            file = work / f"{name}-s{seed}.json"
            file.unlink(missing_ok=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, str(seed), str(file),
                   "--deadline", str(deadline), *passthrough]
            running.append((subprocess.Popen(cmd, env=env), file))
            files.append(file)
        if not running and pending:
            print(f"budget spent: {len(pending)} job(s) not started", flush=True)
            break
        time.sleep(1.0)
        for proc, file in list(running):
            if proc.poll() is not None:
                running.remove((proc, file))
                if proc.returncode != 0:
                    print(f"job {file.stem} exited with code {proc.returncode}", flush=True)
            elif time.time() > deadline + 60:  # a stuck job: stop it, keep what it wrote
                proc.kill()
    records = [json.loads(f.read_text()) for f in files if f.is_file()]
    for r in records:
        r["wall_s_all_jobs"] = round(time.time() - started, 1)
    (out_dir / "gpu_finegrained.json").write_text(json.dumps(records, indent=1) + "\n")
    for r in records:
        curve = " ".join(f"{c['test']['R@1']:.3f}" for c in r["curve"])
        print(json.dumps({k: r[k] for k in ("variant", "seed", "epochs", "test")}))
        print(f"  R@1 per epoch: {curve}")
        print(f"  trunk |w| per epoch: {' '.join(str(c['weight_norm'].get('backbone')) for c in r['curve'])}")
    print(f"wall {time.time() - started:.0f} s; records in {out_dir / 'gpu_finegrained.json'}")
    return 0 if records else 1


if __name__ == "__main__":
    sys.exit(main())
