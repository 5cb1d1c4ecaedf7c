"""The benchmark files in bench/results/ as the Compare page's tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from das_core.store.io import read_json_object

if TYPE_CHECKING:

    pass


BENCH_DAS = ("das_training.json", "das_training_quick.json")


BENCH_STEP = ("das_step.json", "das_step_quick.json")


BENCH_METRICS = ("R@1", "MAP@R", "NMI", "F1")


def _mean_std(v: Any) -> tuple[float, float] | None:
    if isinstance(v, list | tuple) and len(v) == 2 and all(isinstance(x, int | float) for x in v):
        return float(v[0]), float(v[1])
    return None


def _das_rows(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    summary = [r for r in data.get("summary") or [] if isinstance(r, dict)]
    base = {r.get("setting"): r for r in summary if r.get("variant") == "baseline"}
    rows = []
    for r in summary:
        row: dict[str, Any] = {"loss / miner": r.get("setting"), "variant": r.get("variant"), "seeds": r.get("seeds")}
        b = base.get(r.get("setting"))
        for m in BENCH_METRICS:
            ms = _mean_std(r.get(m))
            if ms is None:
                row[m] = None
                continue
            cell = f"{ms[0]:.2f} ± {ms[1]:.2f}"
            bms = _mean_std(b.get(m)) if b is not None and b is not r else None
            if bms is not None:
                cell += f" ({ms[0] - bms[0]:+.2f})"
            row[m] = cell
        rows.append(row)
    return rows


def _step_rows(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in data.get("rows") or []:
        if isinstance(r, dict):
            rows.append({
                "loss": r.get("loss"), "miner": r.get("miner"),
                "plain step (ms)": _round(r.get("plain_ms"), 1), "+ DAS step (ms)": _round(r.get("das_ms"), 1),
                "ratio": _round(r.get("ratio"), 2),
            })
    return rows


def _round(v: Any, nd: int) -> float | None:
    return round(float(v), nd) if isinstance(v, int | float) else None


def bench_summary(results_dir: str | Path) -> dict[str, Any]:
    """The benchmark tables found in ``results_dir`` (``bench/results``).

    ``das``: the DAS training benchmark (baseline vs + DAS, mean ± std over seeds in %, the
    difference to the baseline in brackets), from ``das_training.json``, else the smoke-test
    ``das_training_quick.json`` (``quick`` True); ``step``: the training-step times (plain vs +
    DAS), from ``das_step.json`` else ``das_step_quick.json``. Each is ``None`` when absent or
    unreadable, and ``missing`` then says how to produce it."""
    d = Path(results_dir)
    out: dict[str, Any] = {"das": None, "step": None, "missing": []}
    for key, names, rows_of, how in (
        ("das", BENCH_DAS, _das_rows,
         "the DAS benchmark (baseline vs + DAS, 3 seeds): run `make bench-das` (writes bench/results/das_training.json)"),
        ("step", BENCH_STEP, _step_rows,
         "the step-time benchmark: run `python bench/bench_das_step.py` (writes bench/results/das_step.json)"),
    ):
        for name in names:
            data = read_json_object(d / name)
            if data is None:
                continue
            rows = rows_of(data)
            if not rows:
                continue
            out[key] = {
                "file": str(d / name),
                "quick": name.endswith("_quick.json"),
                "rows": rows,
                "settings": data.get("settings") or data.get("setting"),
                "machine": data.get("machine") or {},
                "extra": {k: data[k] for k in ("worst_ratio_ours", "target", "passed") if k in data},
            }
            break
        if out[key] is None:
            out["missing"].append(f"No results for {how}.")
        elif out[key]["quick"]:
            out["missing"].append(f"Only a quick smoke-test result is there for {how}.")
    return out
