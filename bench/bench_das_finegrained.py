"""Issue 11: does DAS help where it was built to, on many classes with few images each?

Dataset ``emoji-styles`` (about 1,200 emoji classes, 5-9 drawing styles each, a stored
class-disjoint half/half split). CPU setting, named ``lite0-last-stage``: EfficientNet-Lite0
with its ImageNet weights, 64 px inputs; the activations *before its last stage* (block 15,
192 x 2 x 2 at 64 px) are computed once for every image and its horizontal flip and cached;
the last stage (MBConv 192 -> 320), the 1x1 head conv (320 -> 1280, BatchNorm frozen), average
pooling and a 128-d linear embedding layer are trained with the project's loss, miner, DAS and
optimiser (``bench/finegrained.py``). ``--setting frozen-trunk`` trains only the embedding layer
on cached pooled features (the cheaper extra setting of the issue's first probe).

Recipe (the paper's where the CPU allows): Adam, weight decay 4e-4 (coupled, as in the
paper), batch 112 = 56 classes x 2 images, 128-d, frozen BatchNorm, triplet margin 0.2,
DAS T=3 K=4 Z=10 r_s=r_b=0.01, detach on. Differs: lr (``--lr``, default 1e-4 as the
issue's GPU probe, not the paper's 1e-5 over 300 epochs), tens of epochs, 64 px images, flip
as the only augmentation (cached), the trunk below the last stage frozen, the last epoch
reported (no model selection), evaluation on the test classes every epoch.

Plans (``--plan``, run in the order given, each cell a record in
``bench/results/das_finegrained.json``; a finished record is not recomputed):

* ``main``: 5 losses x {baseline, das} x ``--seeds``;
* ``why``: the hypothesis variants of ``finegrained.WHY`` for triplet / distance-weighted
  (AdamW, weight decay 0 with their baselines, --das-grad-norm, --das-exclude-own-copies,
  detach off, r_s = r_b = 0.1, auxiliary loss; the authors' squared triplet form and their
  replacement sampler + bank overflow, with their baselines) x ``--why-seeds``;
* ``ablation``: DFS-only and MTS-only for triplet / distance-weighted x ``--seeds``;
* ``grid``: r_s x r_b in {0.01, 0.1, 0.3} x {0.01, 0.1, 1.0} x ``--grid-seeds``.

    python bench/bench_das_finegrained.py                    # the full run (make bench-finegrained)
    python bench/bench_das_finegrained.py --quick            # <= 10 min: 2 losses, 2 seeds, 6 epochs
    python bench/bench_das_finegrained.py --only 'das|triplet/distance-weighted|s0|rs0.01|rb0.01'

Then ``python bench/summarise_finegrained.py`` writes the paired statistics into README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from common import RESULTS, ROOT, machine_info

OUT = RESULTS / "das_finegrained.json"
QUICK_OUT = RESULTS / "das_finegrained_quick.json"
CACHE = ROOT / "bench" / ".work" / "finegrained"
SETTINGS = {"lite0-head": 16, "lite0-last-stage": 15, "frozen-trunk": 17}
GRID_RS = (0.01, 0.1, 0.3)
GRID_RB = (0.01, 0.1, 1.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="emoji-styles")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--setting", default="lite0-head", choices=tuple(SETTINGS))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--plan", nargs="+", default=["main", "why", "ablation", "grid"],
                    choices=("main", "why", "ablation", "grid"))
    ap.add_argument("--losses", nargs="+", default=None, help="subset of the losses (keys of finegrained.LOSSES)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--why-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--grid-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--steps-per-epoch", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=112, help="real images per batch (2 per class)")
    ap.add_argument("--eval-every", type=int, default=1,
                    help="evaluate the test classes every N epochs (the last always; training is unaffected)")
    ap.add_argument("--budget-minutes", type=float, default=120.0, help="start no new run after this")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="<= 10 min: 2 losses x 2 seeds x 6 epochs, main plan")
    ap.add_argument("--variants", nargs="+", default=None, help="run only these variants of the plans")
    ap.add_argument("--only", default=None, help="run one record by its id (as printed) and print it")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.plan, args.seeds, args.epochs = ["main"], [0, 1], 6
        args.losses = args.losses or ["triplet/distance-weighted", "multi-similarity/multi-similarity"]
    return args


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "dataset": "digits",  # the config's dataset is not used by this loop (features are cached)
        "embedding_dim": 128,
        "batch_size": args.batch_size,
        "samples_per_class": 2,
        "optimizer": "adam",
        "lr": args.lr,
        "weight_decay": 4e-4,
        "epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch,
        "device": "cpu",
        "das_num_produce": 3,
        "das_topk": 4,
        "das_bank_size": 10,
        "das_r_s": 0.01,
        "das_r_b": 0.01,
    }


def plan_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    from finegrained import LOSSES, WHY

    losses = args.losses or list(LOSSES)
    dw = "triplet/distance-weighted"
    runs: list[dict[str, Any]] = []

    def add(variant: str, loss: str, seed: int, overrides: dict[str, Any]) -> None:
        cfg = {**LOSSES[loss], **overrides}
        r_s, r_b = cfg.get("das_r_s", 0.01), cfg.get("das_r_b", 0.01)
        run_id = f"{variant}|{loss}|s{seed}|rs{r_s:g}|rb{r_b:g}"
        runs.append({"id": run_id, "variant": variant, "loss_key": loss, "seed": seed, "overrides": cfg,
                     "r_s": r_s, "r_b": r_b})

    for plan in args.plan:
        if plan == "main":  # loss by loss, so a run cut short by its budget holds whole losses
            for loss in losses:
                for seed in args.seeds:
                    add("baseline", loss, seed, {"das": False})
                    add("das", loss, seed, {"das": True})
        elif plan == "why":  # the key variants for every seed first, then the others
            names = list(WHY)
            for group in (names[:5], names[5:]):
                for seed in args.why_seeds:
                    for name in group:
                        add(name, dw, seed, WHY[name])
        elif plan == "ablation":
            for seed in args.seeds:
                add("dfs-only", dw, seed, {"das": True, "das_mode": "dfs"})
                add("mts-only", dw, seed, {"das": True, "das_mode": "mts"})
        elif plan == "grid":
            for seed in args.grid_seeds:
                for r_s in GRID_RS:
                    for r_b in GRID_RB:
                        add("grid", dw, seed, {"das": True, "das_r_s": r_s, "das_r_b": r_b})
    if args.variants:
        runs = [r for r in runs if r["variant"] in args.variants]
    return runs


# -- cached activations ---------------------------------------------------------------------------


def _images(dataset: Any, size: int) -> Any:
    import numpy as np

    from das_core.data import ArrayDataset

    if isinstance(dataset, ArrayDataset):
        return dataset.images
    out = [np.asarray(dataset.load_image(i).convert("RGB").resize((size, size))) for i in range(len(dataset))]
    return np.stack(out)


def build_cache(args: argparse.Namespace) -> dict[str, Any]:
    """Activations of every train image and its flip, and of every test image, before block
    ``SETTINGS[setting]`` (17: after the head and pooling), at ``--image-size``; cached on disk."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from finegrained import lite0_stem_and_blocks, load_lite0, to_unit_range

    from das_core.data import load_splits

    upto = SETTINGS[args.setting]
    path = CACHE / f"{args.dataset}-{args.image_size}px-b{upto}.pt"
    if path.is_file():
        cached: dict[str, Any] = torch.load(path, weights_only=False)
        return cached
    t0 = time.time()
    splits = load_splits(args.dataset, args.data_root)
    net = load_lite0()
    cache: dict[str, Any] = {"dataset": splits.name, "image_size": args.image_size, "block": upto}

    @torch.no_grad()
    def features(images: Any) -> torch.Tensor:
        parts = []
        for s in range(0, len(images), 256):
            x = to_unit_range(np.ascontiguousarray(images[s : s + 256]), args.image_size)
            if upto >= 17:
                y = F.adaptive_avg_pool2d(net._swish(net._bn1(net._conv_head(lite0_stem_and_blocks(net, x, 16)))), 1)
            else:
                y = lite0_stem_and_blocks(net, x, upto)
            parts.append(y)
        return torch.cat(parts)

    train_images = _images(splits.train, args.image_size)
    cache["train"] = features(train_images)
    cache["train_flip"] = features(train_images[:, :, ::-1])
    cache["train_labels"] = np.asarray(splits.train.labels)
    cache["test"] = features(_images(splits.test, args.image_size))
    cache["test_labels"] = np.asarray(splits.test.labels)
    cache["classes"] = (splits.train.num_classes, splits.test.num_classes)
    cache["seconds"] = time.time() - t0
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(cache, path)
    print(f"cached {args.setting} activations of {args.dataset} in {cache['seconds']:.0f} s -> {path}", flush=True)
    return cache


def run_one(run: dict[str, Any], cache: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from finegrained import Tail, load_lite0, tail_config, train_embedding

    cfg = tail_config({**run["overrides"], "seed": run["seed"]}, recipe(args))
    torch.manual_seed(run["seed"])  # same initial embedding layer for baseline and DAS of a seed
    net = Tail(load_lite0(), SETTINGS[args.setting], cfg.embedding_dim)
    train, flip = cache["train"], cache["train_flip"]
    if train.ndim == 2:
        train, flip = train[:, :, None, None], flip[:, :, None, None]
    test = cache["test"] if cache["test"].ndim == 4 else cache["test"][:, :, None, None]

    def train_x(index: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        flipped = torch.rand(len(index), generator=gen) < 0.5
        return torch.where(flipped[:, None, None, None], flip[index], train[index])

    @torch.no_grad()
    def embed_test(model: torch.nn.Module) -> tuple[Any, Any]:
        model.eval()
        emb = torch.cat([model(test[s : s + 512]) for s in range(0, len(test), 512)])
        return emb.numpy(), cache["test_labels"]

    print(f"{run['id']}", flush=True)
    out = train_embedding(cfg, net, train_x, cache["train_labels"], embed_test, device=torch.device("cpu"),
                          eval_every=args.eval_every)
    return {
        "dataset": cache["dataset"],
        "setting": args.setting,
        "loss": cfg.loss,
        "miner": cfg.miner,
        "variant": run["variant"],
        "id": run["id"],
        "seed": run["seed"],
        "das": cfg.das,
        "r_s": run["r_s"],
        "r_b": run["r_b"],
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "optimizer": cfg.optimizer,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "overrides": {k: v for k, v in run["overrides"].items() if k not in ("loss", "miner")},
        "test": out["test"],
        "curve": out["curve"],
        "seconds": round(out["seconds"], 1),
        "threads": torch.get_num_threads(),
        "command": command_for(run, args),
    }


def command_for(run: dict[str, Any], args: argparse.Namespace) -> str:
    parts = ["python", "bench/bench_das_finegrained.py", "--only", run["id"], "--dataset", args.dataset,
             "--setting", args.setting, "--epochs", str(args.epochs), "--lr", f"{args.lr:g}",
             "--image-size", str(args.image_size), "--threads", str(args.threads),
             "--batch-size", str(args.batch_size)]
    return " ".join(shlex.quote(p) for p in parts)


def same_cell(rec: dict[str, Any], run: dict[str, Any], args: argparse.Namespace) -> bool:
    return (rec.get("id") == run["id"] and rec.get("setting") == args.setting and rec.get("epochs") == args.epochs
            and rec.get("lr") == args.lr and rec.get("image_size") == args.image_size
            and rec.get("dataset") == args.dataset and rec.get("batch_size", 112) == args.batch_size)


def record_key(rec: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(rec.get(k) for k in ("id", "dataset", "setting", "epochs", "lr", "image_size", "batch_size"))


def save_record(path: Path, rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Add ``rec`` to the JSON list in ``path`` (replacing a record of the same cell), under a file
    lock, re-reading the file first: several benchmark processes can share one results file."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = json.loads(path.read_text()) if path.is_file() else []
        records = [r for r in records if record_key(r) != record_key(rec)] + [rec]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=1) + "\n")
        tmp.replace(path)
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    out_path: Path = args.out or (QUICK_OUT if args.quick else OUT)
    runs = plan_runs(args)
    if args.only:
        runs = [r for r in runs if r["id"] == args.only] or [
            r for r in plan_runs(argparse.Namespace(**{**vars(args), "plan": ["main", "why", "ablation", "grid"],
                                                      "losses": None}))
            if r["id"] == args.only
        ][:1]
        if not runs:
            print(f"no run has the id {args.only!r}; ids look like 'das|triplet/distance-weighted|s0|rs0.01|rb0.01'",
                  file=sys.stderr)
            return 2
    records: list[dict[str, Any]] = json.loads(out_path.read_text()) if out_path.is_file() and not args.only else []
    started = time.time()
    cache = build_cache(args)
    print(f"{len(runs)} runs planned; {cache['classes'][0]} train / {cache['classes'][1]} test classes, "
          f"{len(cache['train_labels'])} / {len(cache['test_labels'])} images; {torch.get_num_threads()} thread(s)",
          flush=True)
    machine = machine_info()
    for run in runs:
        if any(same_cell(r, run, args) for r in records):
            continue
        if time.time() - started > args.budget_minutes * 60:
            print(f"budget of {args.budget_minutes:g} min spent: not starting {run['id']} and later runs", flush=True)
            break
        rec = run_one(run, cache, args)
        rec["machine"] = {k: machine.get(k) for k in ("cpu", "cores", "torch")}
        if args.only:
            print(json.dumps({k: v for k, v in rec.items() if k != "curve"}, indent=1))
            return 0
        records = save_record(out_path, rec)
        print(f"  -> R@1 {rec['test']['R@1']:.4f}  MAP@R {rec['test']['MAP@R']:.4f}  ({rec['seconds']:.0f} s; "
              f"{len(records)} records, {(time.time() - started) / 60:.1f} min)", flush=True)
    print(f"wall time {(time.time() - started) / 60:.1f} min, {torch.get_num_threads()} thread(s) -> {out_path}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
