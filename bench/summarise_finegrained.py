"""Paired statistics of the fine-grained DAS benchmark, written into README.md.

For each loss: the paired difference DAS − baseline (same seed, same setting) in R@1 and
MAP@R, its mean and 95 % t-interval over the seeds (scipy), and a verdict read from the
interval only: "helps" (interval above 0), "hurts" (below 0), else "no detectable difference
at N seeds". The same for the ablations, the r_s x r_b grid and the "why" variants (each
against the baseline of its own seed; AdamW, weight-decay-0, squared-triplet and
replacement-sampler DAS runs also against the baseline trained the same way), with the
per-epoch curves summarised as the peak epoch and the drop from the peak. The Fashion-MNIST benchmark (``das_training.json``) gets the same
paired intervals for the joint reading.

    python bench/summarise_finegrained.py [--results FILE ...] [--print]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from common import RESULTS, replace_readme_section

DEFAULT = RESULTS / "das_finegrained.json"
WHY_CONTROL = {"das+adamw": "baseline+adamw", "das+wd0": "baseline+wd0", "das+squared": "baseline+squared",
               "das+replacement-overflow": "baseline+replacement"}


def paired(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t-interval of paired differences (NaN interval below 2 pairs)."""
    from scipy import stats

    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(lo: float, hi: float, n: int) -> str:
    if math.isnan(lo):
        return f"no interval at {n} seed"
    if lo > 0:
        return "helps"
    if hi < 0:
        return "hurts"
    return f"no detectable difference at {n} seeds"


def _fmt(mean: float, lo: float, hi: float) -> str:
    if math.isnan(lo):
        return f"{mean:+.2f}"
    return f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def compare(records: list[dict[str, Any]], key_a: Any, key_b: Any) -> dict[str, Any] | None:
    """Pair records selected by ``key_a(rec)`` (treatment) and ``key_b(rec)`` (control) by seed."""
    a = {(r["seed"], r.get("epochs")): r for r in records if key_a(r)}
    b = {(r["seed"], r.get("epochs")): r for r in records if key_b(r)}
    seeds = sorted(set(a) & set(b))  # pairs: same seed, same number of epochs
    if not seeds:
        return None
    out: dict[str, Any] = {"seeds": [s for s, _ in seeds], "n": len(seeds), "epochs": sorted({e for _, e in seeds if e is not None})}
    for m in ("R@1", "MAP@R"):
        diffs = [100 * (a[s]["test"][m] - b[s]["test"][m]) for s in seeds]
        mean, lo, hi = paired(diffs)
        out[m] = {"mean": mean, "lo": lo, "hi": hi, "verdict": verdict(lo, hi, len(seeds)),
                  "treated": sum(100 * a[s]["test"][m] for s in seeds) / len(seeds),
                  "control": sum(100 * b[s]["test"][m] for s in seeds) / len(seeds)}
    out["curve"] = curve_summary([a[s] for s in seeds])
    return out


def curve_summary(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of: the epoch of peak test R@1, the drop from that peak to the last
    epoch, the backbone weight norm at the last epoch and a few DAS diagnostics (epoch mean)."""
    peaks, drops, norms = [], [], []
    diag: dict[str, list[float]] = defaultdict(list)
    for r in recs:
        curve = r.get("curve") or []
        evaluated = [c for c in curve if "test" in c]
        if not evaluated:
            continue
        norms.append(curve[-1].get("weight_norm", {}).get("backbone", math.nan))
        if len(evaluated) > 1:  # runs evaluated at the last epoch only have no curve to read
            r1 = [c["test"]["R@1"] for c in evaluated]
            best = max(range(len(r1)), key=lambda i: r1[i])
            peaks.append(evaluated[best]["epoch"])
            drops.append(100 * (r1[-1] - r1[best]))
        for c in curve:
            for k, v in (c.get("das_diagnostics") or {}).items():
                diag[k].append(v)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else math.nan

    return {"peak_epoch": mean(peaks), "drop_from_peak": mean(drops), "weight_norm": mean(norms),
            "diagnostics": {k: mean(v) for k, v in diag.items()}}


def main_setting(records: list[dict[str, Any]]) -> tuple[Any, ...]:
    keys = Counter((r["dataset"], r["setting"], r["lr"]) for r in records if r["variant"] == "baseline")
    return keys.most_common(1)[0][0]


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    dataset, setting, lr = main_setting(records)
    recs = [r for r in records if (r["dataset"], r["setting"], r["lr"]) == (dataset, setting, lr)]
    epochs = sorted({r["epochs"] for r in recs})
    losses = sorted({(r["loss"], r["miner"]) for r in recs if r["variant"] == "das"})
    base = {lm: (lambda r, lm=lm: r["variant"] == "baseline" and (r["loss"], r["miner"]) == lm) for lm in losses}
    main = {f"{lo} / {mi}": compare(recs, lambda r, lm=(lo, mi): r["variant"] == "das" and (r["loss"], r["miner"]) == lm,
                                     base[(lo, mi)]) for lo, mi in losses}
    dw = ("triplet", "distance-weighted")
    dw_base = base.get(dw, lambda r: False)
    others: dict[str, Any] = {}
    for variant in sorted({r["variant"] for r in recs if (r["loss"], r["miner"]) == dw} - {"baseline", "das", "grid"}):
        others[variant] = compare(recs, lambda r, v=variant: r["variant"] == v and (r["loss"], r["miner"]) == dw, dw_base)
        if variant in WHY_CONTROL:
            ctrl = WHY_CONTROL[variant]
            others[f"{variant} vs {ctrl}"] = compare(
                recs, lambda r, v=variant: r["variant"] == v and (r["loss"], r["miner"]) == dw,
                lambda r, c=ctrl: r["variant"] == c and (r["loss"], r["miner"]) == dw)
    grid = {}
    for r_s, r_b in sorted({(r["r_s"], r["r_b"]) for r in recs if r["variant"] == "grid"}):
        grid[(r_s, r_b)] = compare(recs, lambda r, a=r_s, b=r_b: r["variant"] == "grid" and (r["r_s"], r["r_b"]) == (a, b),
                                   dw_base)
    curves: dict[str, dict[int, float]] = {}
    for variant in ["baseline", "das", *sorted({r["variant"] for r in recs if (r["loss"], r["miner"]) == dw} - {"baseline", "das", "grid"})]:
        per: dict[int, list[float]] = defaultdict(list)
        for r in recs:
            if r["variant"] == variant and (r["loss"], r["miner"]) == dw:
                for c in r.get("curve") or []:
                    if "test" in c:
                        per[int(c["epoch"])].append(100 * c["test"]["R@1"])
        if per:
            curves[variant] = {e: sum(v) / len(v) for e, v in per.items()}
    curve_epochs = [e for e in (1, 2, 3, 4, 6, 8, 9, 10, 12) if any(e in c for c in curves.values())]
    seconds = sum(r.get("seconds", 0) for r in recs)
    threads = sorted({r.get("threads") for r in recs})
    return {"dataset": dataset, "setting": setting, "epochs": epochs, "lr": lr, "main": main, "others": others,
            "grid": grid, "curves": curves, "curve_epochs": curve_epochs, "seconds": seconds, "threads": threads, "n_records": len(recs)}


def fashion_mnist() -> dict[str, Any]:
    path = RESULTS / "das_training.json"
    if not path.is_file():
        return {}
    runs = json.loads(path.read_text())["runs"]
    out = {}
    for setting in sorted({r["setting"] for r in runs}):
        res = compare(runs, lambda r, s=setting: r["setting"] == s and r["variant"] == "+ DAS",
                      lambda r, s=setting: r["setting"] == s and r["variant"] == "baseline")
        if res:
            out[setting] = res
    return out


def render(s: dict[str, Any], fm: dict[str, Any]) -> str:
    lines = [
        f"Dataset `{s['dataset']}`, setting `{s['setting']}` (see above), lr {s['lr']:g}, last epoch reported (no "
        "model selection). Paired difference DAS − baseline (same seed, same epochs), in points, mean [95 % "
        "t-interval over seeds]; the verdict reads the interval only. R@1 and MAP@R in %.",
        "",
        "| loss / miner | epochs | seeds | baseline R@1 | + DAS R@1 | Δ R@1 | Δ MAP@R | verdict (R@1) | verdict (MAP@R) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, res in s["main"].items():
        if res is None:
            continue
        r1, mp = res["R@1"], res["MAP@R"]
        lines.append(f"| {name} | {'/'.join(map(str, res['epochs']))} | {res['n']} | {r1['control']:.2f} | "
                     f"{r1['treated']:.2f} | "
                     f"{_fmt(r1['mean'], r1['lo'], r1['hi'])} | {_fmt(mp['mean'], mp['lo'], mp['hi'])} | "
                     f"{r1['verdict']} | {mp['verdict']} |")
    if s["others"]:
        lines += [
            "",
            "Ablations and the \"why\" variants, triplet / distance-weighted, each against the plain baseline of "
            "the same seed (AdamW / weight decay 0 / squared triplet / replacement sampler DAS runs also against "
            "the baseline trained the same way). "
            "Curve: mean epoch of peak test R@1 and the drop from the peak to the last epoch; |w|: backbone "
            "weight norm at the last epoch; grad ratio: gradient reaching the real embeddings, DAS loss / "
            "baseline loss on the same batch (before --das-grad-norm rescales it); own: share of mined tuples pairing an embedding with its own copy; "
            "active: share of non-zero loss terms.",
            "",
            "| variant | seeds | R@1 | Δ R@1 | Δ MAP@R | verdict (R@1) | peak epoch | drop from peak | |w| | "
            "grad ratio | own | active |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        rows = [("das (paper)", s["main"].get("triplet / distance-weighted")), *s["others"].items()]
        for name, res in rows:
            if res is None:
                continue
            r1, mp, c = res["R@1"], res["MAP@R"], res["curve"]
            d = c["diagnostics"]
            lines.append(
                f"| {name} | {res['n']} | {r1['treated']:.2f} | {_fmt(r1['mean'], r1['lo'], r1['hi'])} | "
                f"{_fmt(mp['mean'], mp['lo'], mp['hi'])} | {r1['verdict']} | {c['peak_epoch']:.1f} | "
                f"{c['drop_from_peak']:.2f} | {c['weight_norm']:.1f} | {_num(d.get('grad_ratio'))} | "
                f"{_num(d.get('share_own_copy'))} | {_num(d.get('share_active'))} |")
        base_curve = (s["main"].get("triplet / distance-weighted") or {}).get("curve")
        if base_curve:
            pass
    if s.get("curves"):
        eps = s["curve_epochs"]
        lines += ["", "Test R@1 (%) by epoch, triplet / distance-weighted, mean over the seeds evaluated at that epoch "
                  "(the main runs of seeds 3-4 and some why-runs were evaluated every 3rd epoch or at the last only):",
                  "", "| variant | " + " | ".join(f"ep {e}" for e in eps) + " |", "|---|" + "---:|" * len(eps)]
        for name, by_epoch in s["curves"].items():
            cells = [f"{by_epoch[e]:.1f}" if e in by_epoch else "" for e in eps]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if s["grid"]:
        lines += ["", "r_s × r_b grid (DAS, triplet / distance-weighted): Δ R@1 against the baseline of the same seed.",
                  ""]
        rbs = sorted({k[1] for k in s["grid"]})
        lines.append("| r_s \\ r_b | " + " | ".join(f"{b:g}" for b in rbs) + " |")
        lines.append("|---|" + "---:|" * len(rbs))
        for r_s in sorted({k[0] for k in s["grid"]}):
            cells = []
            for r_b in rbs:
                res = s["grid"].get((r_s, r_b))
                cells.append("" if res is None else f"{_fmt(res['R@1']['mean'], res['R@1']['lo'], res['R@1']['hi'])} "
                             f"({res['n']})")
            lines.append(f"| {r_s:g} | " + " | ".join(cells) + " |")
    lines += ["", f"{s['n_records']} runs, {s['seconds'] / 60:.0f} min of training in all, {s['threads']} thread(s). "
              "Regenerate: `make bench-finegrained`, then `python bench/summarise_finegrained.py`; one run: "
              "its `command` in `bench/results/das_finegrained.json`."]
    if fm:
        lines += ["", "The Fashion-MNIST benchmark above, as paired intervals of Δ R@1 (DAS − baseline, same seed):",
                  ""]
        lines.append("| loss / miner | seeds | Δ R@1 | verdict |")
        lines.append("|---|---:|---:|---|")
        for name, res in fm.items():
            r1 = res["R@1"]
            lines.append(f"| {name} | {res['n']} | {_fmt(r1['mean'], r1['lo'], r1['hi'])} | {r1['verdict']} |")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, nargs="+", default=[DEFAULT], help="result files (missing ones skipped)")
    ap.add_argument("--print", action="store_true", help="print the table instead of writing README.md")
    args = ap.parse_args()
    records = [r for path in args.results if path.is_file() for r in json.loads(path.read_text())]
    s = summarise(records)
    text = render(s, fashion_mnist())
    if args.print or not replace_readme_section("finegrained-table", text):
        print(text)
    else:
        print(f"README.md updated from {len(records)} records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
