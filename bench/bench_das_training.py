"""Issue 3: does DAS help? Baseline vs + DAS on the embedded zero-shot split.

Fashion-MNIST classes 0-4 train, 5-9 test (35,000 images each), the small CNN of the
demo, 128-d. For each loss/miner: the same run without and with DAS (T=3, K=4, Z=10,
r_s = r_b = 0.01, the paper's defaults), 3 seeds each, plus the DFS-only / MTS-only
ablation and the auxiliary-loss variant (``L(real) + L(real + produced)``) for triplet +
distance-weighted. Every run is an ordinary
``python -m das_core train`` run (printed below, rerunnable one by one); the last
epoch is reported (no model selection on the test classes). Results: mean +- std of
R@1, MAP@R, NMI, F1 on the test classes, in ``bench/results/das_training.json`` and in
README.md. A finished run is not recomputed (delete the JSON to start over).

    python bench/bench_das_training.py [--seeds 0 1 2] [--epochs 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from common import RESULTS, ROOT, machine_info, replace_readme_section

COMMON = {
    "dataset": "fashion-mnist",
    "backbone": "small-cnn",
    "embedding_dim": 128,
    "batch_size": 100,
    "samples_per_class": 20,
    "lr": 1e-3,
    "weight_decay": 4e-4,
    "device": "cpu",
}
# name -> config overrides; each is run with das off and on unless it is an ablation.
SETTINGS: dict[str, dict[str, Any]] = {
    "triplet / semi-hard": {"loss": "triplet", "miner": "semi-hard"},
    "triplet / distance-weighted": {"loss": "triplet", "miner": "distance-weighted"},
    "contrastive / distance-weighted": {"loss": "contrastive", "miner": "distance-weighted"},
    "margin / distance-weighted": {"loss": "margin", "miner": "distance-weighted"},
    "multi-similarity / MS miner": {"loss": "multi-similarity", "miner": "multi-similarity"},
    "PDDM (E_m + λE_e), 8 quadruplets / batch": {"loss": "pddm", "miner": "none", "pddm_quadruplets": 8},
}
ABLATION = ("triplet / distance-weighted", {"dfs": {"das_mode": "dfs"}, "mts": {"das_mode": "mts"}})
METRICS = ("R@1", "MAP@R", "NMI", "F1")
OUT = RESULTS / "das_training.json"


def variants(quick: bool) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    settings = dict(list(SETTINGS.items())[:2]) if quick else SETTINGS
    for name, values in settings.items():
        out.append((name, "baseline", {**values, "das": False}))
        out.append((name, "+ DAS", {**values, "das": True}))
    if not quick:
        name, abl = ABLATION
        out.append((name, "+ DFS only", {**SETTINGS[name], "das": True, **abl["dfs"]}))
        out.append((name, "+ MTS only", {**SETTINGS[name], "das": True, **abl["mts"]}))
        # the auxiliary-loss variant: L(real) + 1 * L(real + produced), the real-only term at full strength
        out.append((name, "+ DAS, aux loss w=1", {**SETTINGS[name], "das": True, "das_aux_weight": 1.0}))
    return out


# CPU float sums, hence a run's exact numbers, depend on the thread count: every run uses this
# many, and a stored run made with another count is made again.
THREADS = 2


def command(values: dict[str, Any]) -> str:
    parts = [f"OMP_NUM_THREADS={THREADS} python -m das_core train"]
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else f"--no-{flag[2:]}")
        else:
            parts.append(f"{flag} {v}")
    return " ".join(parts)


def run_one(values: dict[str, Any], work: Path) -> dict[str, float]:
    from das_core.training.config import TrainConfig
    from das_core.training.loop import train

    cfg = TrainConfig.from_mapping({**values, "out": str(work)})
    result = train(cfg, show_progress=False)
    test: dict[str, float] = result.last["test"]
    return test


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in runs:
        groups.setdefault((r["setting"], r["variant"]), []).append(r["test"])
    rows = []
    for (setting, variant), tests in groups.items():
        row: dict[str, Any] = {"setting": setting, "variant": variant, "seeds": len(tests)}
        for m in METRICS:
            vals = [100 * t[m] for t in tests]
            row[m] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| loss / miner | variant | " + " | ".join(METRICS) + " |", "|---|---|" + "---:|" * len(METRICS)]
    base: dict[str, dict[str, Any]] = {r["setting"]: r for r in rows if r["variant"] == "baseline"}
    for r in rows:
        cells = []
        for m in METRICS:
            mean, std = r[m]
            cell = f"{mean:.2f} ± {std:.2f}"
            b = base.get(r["setting"])
            if b is not None and r is not b:
                delta = mean - b[m][0]
                cell += f" ({delta:+.2f})"
            cells.append(cell)
        lines.append(f"| {r['setting']} | {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 settings, 1 seed, 1 short epoch (a smoke test)")
    args = ap.parse_args()
    import tempfile

    import torch

    torch.set_num_threads(THREADS)
    seeds = args.seeds[:1] if args.quick else args.seeds
    # evaluate once, after the last epoch: that is the number reported
    extra: dict[str, Any] = (
        {"epochs": 1, "steps_per_epoch": 30} if args.quick else {"epochs": args.epochs, "eval_every": args.epochs}
    )
    out_file = RESULTS / ("das_training_quick.json" if args.quick else "das_training.json")
    done: dict[str, Any] = json.loads(out_file.read_text()) if out_file.is_file() else {}
    runs: list[dict[str, Any]] = [r for r in done.get("runs", []) if r.get("threads") == THREADS]
    finished = {(r["setting"], r["variant"], r["seed"]) for r in runs}
    for setting, variant, values in variants(args.quick):
        for seed in seeds:
            if (setting, variant, seed) in finished:
                continue
            cfg_values = {**COMMON, **values, **extra, "seed": seed}
            print(f"[{setting} | {variant} | seed {seed}]  {command(cfg_values)}", flush=True)
            t = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                test = run_one(cfg_values, Path(tmp) / "run")
            runs.append(
                {"setting": setting, "variant": variant, "seed": seed, "test": test, "seconds": time.time() - t,
                 "threads": THREADS, "command": command(cfg_values)}
            )
            print("   " + "  ".join(f"{m} {100 * test[m]:.2f}" for m in METRICS) + f"  ({time.time() - t:.0f} s)", flush=True)
            RESULTS.mkdir(parents=True, exist_ok=True)
            out_file.write_text(json.dumps({"machine": machine_info(), "runs": runs}, indent=2, default=float) + "\n")
    rows = summarise(runs)
    out_file.write_text(
        json.dumps({"machine": machine_info(), "settings": {**COMMON, **extra}, "summary": rows, "runs": runs},
                   indent=2, default=float) + "\n"
    )
    text = table(rows)
    print(text)
    if not args.quick:
        note = (
            f"\n{len(seeds)} seeds ({', '.join(map(str, seeds))}), {args.epochs} epochs, last epoch reported; "
            f"test classes 5-9 (35,000 images). Mean ± std in %, (difference to the baseline's mean). "
            f"Machine: {machine_info()['cpu']}. Regenerate: `make bench-das`; one run: the command in "
            "`bench/results/das_training.json`."
        )
        replace_readme_section("das-table", text + "\n" + note)
    print(f"wrote {out_file}  (repo {ROOT})")


if __name__ == "__main__":
    main()
