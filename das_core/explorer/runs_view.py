"""Runs as the Train and Compare pages list them: progress, curves, DAS diagnostics, the runs
table, checkpoint info.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from das_core.store.io import read_json_object
from das_core.store.layout import RunLayout, demo_metrics
from das_core.training.config import ConfigError, load_config_file

if TYPE_CHECKING:

    pass


METRICS = ("R@1", "R@2", "R@4", "R@8", "MAP@R", "NMI", "F1")






def progress_summary(progress: Mapping[str, Any]) -> dict[str, Any]:
    """A running job's ``progress.json`` as ``fraction`` (0-1 of all steps of all epochs),
    ``text`` (epoch, step, loss, ETA) and ``eta`` seconds (``None`` when unknown)."""
    def num(key: str) -> float | None:
        v = progress.get(key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None

    epoch, epochs, step, steps = num("epoch"), num("epochs"), num("step"), num("steps")
    fraction = 0.0
    if epoch and epochs and steps:
        fraction = min(1.0, max(0.0, ((epoch - 1) * steps + (step or 0.0)) / (epochs * steps)))
    parts = []
    if epoch is not None and epochs is not None:
        parts.append(f"epoch {int(epoch)}/{int(epochs)}")
    if step is not None and steps is not None:
        parts.append(f"step {int(step)}/{int(steps)}")
    loss = num("loss")
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    state = progress.get("state")
    if state == "evaluating":
        parts.append("evaluating")
    eta = num("eta")
    if eta is not None and state != "done":
        parts.append(f"ETA {format_seconds(eta)}")
    return {"fraction": fraction, "text": " · ".join(parts) or "starting…", "eta": eta, "state": state}


def format_seconds(s: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """A checkpoint's config, metrics and epoch from its metadata alone (no tensors read);
    ``CheckpointError`` for a file that is not one of ours."""
    from das_core.store.checkpoint import parse_metadata, read_safetensors_header

    p = Path(path)
    meta = read_safetensors_header(p).get("__metadata__") or {}
    parsed = parse_metadata(p, meta)  # the one validation every reader of a checkpoint shares
    return {
        "config": parsed["config"].to_dict(),
        "metrics": parsed["metrics"],
        "epoch": parsed["epoch"],
        "dataset": parsed["dataset"],
    }


def _history(source: Path | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(source, Path | str):
        from das_core.store.io import read_jsonl

        p = Path(source)
        return read_jsonl(RunLayout(p).history if p.is_dir() else p)
    return [dict(r) for r in source]


def _epoch(record: Mapping[str, Any], default: int = 0) -> int:
    """A record's epoch; ``default`` when it holds none that is a whole number (a line of a
    metrics.jsonl edited or damaged by hand is shown as nothing, never a traceback)."""
    e = record.get("epoch")
    return e if isinstance(e, int) and not isinstance(e, bool) and 0 <= e <= 10**7 else default


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else float("nan")


def run_curves(source: Path | Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Per epoch (sorted, one entry per epoch, the last record wins): ``epoch``,
    ``train_loss``, ``test R@1``, ``val R@1`` (NaN where an epoch was not evaluated or has no
    such split). ``source``: a run folder, a ``metrics.jsonl`` file or the records."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for r in _history(source):
        if _epoch(r, -1) >= 0:
            by_epoch[_epoch(r)] = r
    nan = float("nan")
    out: dict[str, list[float]] = {"epoch": [], "train_loss": [], "test R@1": [], "val R@1": []}
    for e in sorted(by_epoch):
        r = by_epoch[e]
        out["epoch"].append(float(e))
        out["train_loss"].append(_number(r.get("train_loss")))
        for split in ("test", "val"):
            m = r.get(split)
            out[f"{split} R@1"].append(_number(m.get("R@1")) if isinstance(m, dict) else nan)
    return out


DIAGNOSTIC_LABELS = {
    "weight_norm.backbone": "weight norm: backbone",
    "weight_norm.backbone_last": "weight norm: backbone's last layer",
    "weight_norm.embed": "weight norm: embedding layer",
    "das_diagnostics.share_produced": "DAS: share of tuples with a produced embedding",
    "das_diagnostics.share_own_copy": "DAS: share of tuples pairing an embedding with its own copy",
    "das_diagnostics.share_active": "DAS: share of non-zero loss terms",
    "das_diagnostics.grad_ratio": "DAS: gradient on real embeddings, DAS / baseline loss",
    "das_diagnostics.grad_das": "DAS: gradient norm on real embeddings (DAS loss)",
    "das_diagnostics.grad_baseline": "DAS: gradient norm on real embeddings (plain loss, same batch)",
    "das_diagnostics.grad_real_terms": "DAS: gradient norm from real-only tuples",
    "das_diagnostics.grad_produced_terms": "DAS: gradient norm from tuples with produced embeddings",
    "das_diagnostics.loss_real": "DAS: loss on real-only tuples",
    "das_diagnostics.loss_produced": "DAS: loss on tuples with produced embeddings",
    "das_diagnostics.bank_age_steps": "DAS: mean age of the bank rows used (steps)",
    "das_diagnostics.produced_offset": "DAS: distance of a produced embedding from its source",
}


def run_diagnostics(source: Path | Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Per epoch: ``epoch`` and every weight norm and DAS diagnostic the run logged, keyed
    ``weight_norm.<part>`` / ``das_diagnostics.<name>`` (NaN where an epoch lacks it)."""
    by_epoch: dict[int, Mapping[str, Any]] = {}
    for r in _history(source):
        if isinstance(r.get("epoch"), int | float):
            by_epoch[int(r["epoch"])] = r
    keys = sorted({f"{group}.{k}" for r in by_epoch.values() for group in ("weight_norm", "das_diagnostics")
                   if isinstance(r.get(group), dict) for k in r[group]})
    out: dict[str, list[float]] = {"epoch": [float(e) for e in sorted(by_epoch)]}
    for key in keys:
        group, name = key.split(".", 1)
        out[key] = [float((by_epoch[e].get(group) or {}).get(name, float("nan"))) for e in sorted(by_epoch)]
    return out


def _metrics(record: Mapping[str, Any] | None, split: str) -> dict[str, float]:
    m = (record or {}).get(split)
    return {k: float(v) for k, v in m.items() if isinstance(v, int | float)} if isinstance(m, dict) else {}


def _last_with(history: Sequence[Mapping[str, Any]], split: str) -> Mapping[str, Any] | None:
    return next((r for r in reversed(history) if isinstance(r.get(split), dict)), None)


def _selected(history: Sequence[Mapping[str, Any]], metric: str) -> Mapping[str, Any] | None:
    """The epoch with the best validation ``metric`` (the first of ties), as training selects."""
    best: Mapping[str, Any] | None = None
    for r in history:
        v = _metrics(r, "val").get(metric)
        if v is not None and (best is None or v > _metrics(best, "val")[metric]):
            best = r
    return best


def _row(
    name: str, kind: str, config: Mapping[str, Any], history: Sequence[Mapping[str, Any]],
    selected: Mapping[str, Any] | None, *, state: str, checkpoint: Path | None, path: Path,
    metrics: Path | None, params: str | None = None,
) -> dict[str, Any]:
    last = _last_with(history, "test")
    test = _metrics(last, "test")
    done = max((_epoch(r) for r in history), default=0)
    row: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "params": params,
        "dataset": config.get("dataset"),
        "DAS": bool(config.get("das", False)),
        "loss": config.get("loss"),
        "miner": config.get("miner"),
        "backbone": config.get("backbone"),
        "dim": config.get("embedding_dim"),
        "seed": config.get("seed"),
        "epochs": done,
        "planned": config.get("epochs"),
        "state": state,
        "test epoch": None if last is None else _epoch(last),
    }
    for m in METRICS:
        row[m] = test.get(m)
    sel_test = _metrics(selected, "test") if selected is not None else {}
    row["selected epoch"] = None if selected is None else _epoch(selected)
    for m in METRICS:
        row[f"sel. {m}"] = sel_test.get(m)
    row["checkpoint"] = None if checkpoint is None else str(checkpoint)
    row["path"] = str(path)
    row["metrics"] = str(metrics) if metrics is not None else None
    return row


def _run_state(run_dir: Path, history: Sequence[Mapping[str, Any]], planned: Any) -> str:
    run = RunLayout(run_dir)
    job = read_json_object(run.job)
    if job is not None and isinstance(job.get("state"), str):
        return str(job["state"])
    progress = read_json_object(run.progress) or {}
    if run.summary.is_file() or progress.get("state") == "done":
        return "done"
    done = max((_epoch(r) for r in history), default=0)
    return "done" if isinstance(planned, int) and done >= planned else "partial"


def _run_config(run_dir: Path, checkpoint: Path | None) -> dict[str, Any]:
    saved = RunLayout(run_dir).config
    if saved.is_file():
        try:
            return load_config_file(saved)
        except ConfigError:
            pass
    if checkpoint is not None:
        try:
            info = checkpoint_info(checkpoint)
            cfg: dict[str, Any] = info["config"]
            return cfg
        except (ValueError, OSError):
            pass
    return {}


def _run_row(
    path: Path, checkpoint: Path | None, hist: list[dict[str, Any]], *, name: str | None = None, kind: str = "run",
    swept: Sequence[str] = (),
) -> dict[str, Any]:
    """A run folder's row; ``swept``: the ``TrainConfig`` fields a sweep chose for this run
    (shown in ``params`` with the values of the run's own config)."""
    cfg = _run_config(path, checkpoint)
    run = RunLayout(path)
    summary = read_json_object(run.summary) or {}
    sel: Mapping[str, Any] | None = None
    if any(isinstance(r.get("val"), dict) for r in hist):
        want = summary.get("selected_epoch")
        sel = next((r for r in hist if want is not None and r.get("epoch") == want), None)
        if sel is None:
            sel = _selected(hist, str(cfg.get("select_metric", "R@1")))
    params = None
    if swept:
        from das_core.training.sweep import shown_values

        params = shown_values({f: cfg[f] for f in swept if f in cfg}) or None
    return _row(name or path.name, kind, cfg, hist, sel, state=_run_state(path, hist, cfg.get("epochs")),
                checkpoint=checkpoint, path=path, metrics=run.history if hist else None, params=params)


def run_row(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``runs_table`` row of one run folder (``None`` when it holds neither a checkpoint
    nor metrics yet)."""
    from das_core.store.runs import read_run

    info = read_run(Path(run_dir))
    return None if info is None else _run_row(info.path, info.checkpoint, info.history)


def _trial_rows(root: Path | None) -> list[dict[str, Any]]:
    """The rows of the sweep trials under ``root`` (sweeps newest first, trials by number),
    named ``<sweep>/trial-NNNN``, with the swept parameters in ``params``."""
    from das_core.store.runs import default_runs_root
    from das_core.store.sweeps import find_sweeps, read_sweep_config, trial_runs

    rows: list[dict[str, Any]] = []
    for sweep in find_sweeps(root or default_runs_root()):
        try:
            swept: tuple[str, ...] = tuple(p.name for p in read_sweep_config(sweep).params)
        except ConfigError:  # a damaged sweep.json: its trials are still listed, without params
            swept = ()
        for run in trial_runs(sweep):
            rows.append(_run_row(run.path, run.checkpoint, run.history, name=f"{sweep.name}/{run.path.name}",
                                 kind="sweep trial", swept=swept))
    return rows


def runs_table(runs_root: str | Path | None = None, *, demos: Sequence[str | Path] | None = None) -> list[dict[str, Any]]:
    """One row per demo checkpoint (first), per run folder under ``runs_root`` (newest
    first; folders with a checkpoint or metrics) and per sweep trial with a checkpoint or
    metrics (last; named ``<sweep>/trial-NNNN``): name, kind (demo | run | sweep trial),
    params (a trial's swept values, ``r_s=0.01, r_b=0.5``; ``None`` otherwise), dataset, DAS,
    loss, miner, backbone, dim, seed, epochs done / planned, state, the test metrics of the
    last evaluated epoch (``R@1`` ... ``F1``, fractions; ``test epoch``), and, when the run
    has a validation split, the selected epoch (best validation ``select_metric``, the one in
    ``best.safetensors``) and its test metrics (``sel. R@1`` ...); checkpoint and folder paths.

    A demo's metrics come from ``<name>.metrics.jsonl`` beside it (else from the checkpoint's
    own record) and its selected epoch is the checkpoint's epoch."""
    from das_core.store.runs import list_runs

    rows: list[dict[str, Any]] = []
    for d in demos or ():
        p = Path(d)
        try:
            info = checkpoint_info(p)
        except (ValueError, OSError):
            continue
        metrics_file = demo_metrics(p)
        hist = _history(metrics_file) if metrics_file.is_file() else []
        if not hist and info["metrics"]:
            hist = [info["metrics"]]
        cfg = info["config"]
        demo_sel = next((r for r in hist if _epoch(r, -1) == info["epoch"]), info["metrics"] or None)
        has_val = any(isinstance(r.get("val"), dict) for r in hist)
        rows.append(_row(p.stem, "demo", cfg, hist, demo_sel if has_val else None, state="done", checkpoint=p, path=p,
                         metrics=metrics_file if metrics_file.is_file() else None))
    root = Path(runs_root) if runs_root is not None else None
    for run in list_runs(root):
        rows.append(_run_row(run.path, run.checkpoint, run.history))
    rows.extend(_trial_rows(root))
    return rows


__all__ = [
    "METRICS",
    "checkpoint_info",
    "format_seconds",
    "progress_summary",
    "run_curves",
    "run_row",
    "runs_table",
]
