"""What the app's Retrieve, Train and Compare pages show, computed here (tested) so that the
pages only read widgets and draw.

- Retrieval of one query: ``embed_images`` (exactly the checkpoint's evaluation
  preprocessing), ``retrieve`` (k nearest gallery items, right/wrong marks, per-query recall),
  ``sample_queries`` / ``parse_sample_name`` (the sample images and the class their name says).
- The training form: ``config_fields`` (one widget description per ``TrainConfig`` field, from
  its rule) and ``form_values`` (a preset's values over the defaults).
- Runs and benchmarks: ``runs_table`` (every run folder and demo checkpoint with its test
  metrics, last and selected epoch), ``run_curves`` (loss and R@1 per epoch), ``bench_summary``
  (the DAS and step-time tables of ``bench/results``).
- Two checkpoints' maps: ``comparable`` (may the same item indices be compared?) and
  ``map_shift`` (align the maps, the points that moved most and their neighbourhoods).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from das_core.config import GROUPS, ConfigError, TrainConfig, load_config_file
from das_core.io import read_json_object

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from das_core.index import RetrievalIndex

METRICS = ("R@1", "R@2", "R@4", "R@8", "MAP@R", "NMI", "F1")
RECALL_KS = (1, 2, 4, 8)
SPLIT_NAMES = ("train", "val", "test")

# -- retrieval of one query -----------------------------------------------------------------------


def embed_images(model: torch.nn.Module, images: Sequence[Image.Image], device: str = "cpu") -> np.ndarray:
    """``(n, d)`` float32 embeddings of PIL images, each prepared with the model's own
    evaluation preprocessing (``model.preprocessing.prepare``: the checkpoint's, the same
    as the gallery's)."""
    import torch

    prep = getattr(model, "preprocessing", None)
    if prep is None:
        raise TypeError("embed_images needs a model with a .preprocessing (an EmbeddingNet)")
    if not images:
        d = int(getattr(model, "embedding_dim", 0))
        return np.zeros((0, d), np.float32)
    x = torch.cat([prep.prepare(img) for img in images]).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x).float().cpu().numpy()
    finally:
        model.train(was_training)
    return np.ascontiguousarray(out, dtype=np.float32)


@dataclass(frozen=True)
class QueryResult:
    """The k nearest gallery items of one query, nearest first."""

    indices: np.ndarray  # (k,) int64 gallery indices
    distances: np.ndarray  # (k,) float32 L2 distances
    labels: np.ndarray  # (k,) int64 gallery labels
    query_label: int | None
    exclude: int | None  # the gallery index left out (the query itself), if any
    relevant: int | None  # same-class items in the gallery (without the excluded one)
    seconds: float

    @property
    def k(self) -> int:
        return int(len(self.indices))

    @property
    def correct(self) -> np.ndarray | None:
        """``(k,)`` bool: result has the query's label (``None`` when the label is unknown)."""
        if self.query_label is None:
            return None
        out: np.ndarray = self.labels == int(self.query_label)
        return out

    def summary(self) -> dict[str, Any]:
        """Per-query numbers: ``R@n`` (1 if one of the first n is right), ``P@k``, hits, rank
        of the first right result, AP over the k results (``None`` without a label)."""
        return query_summary(self.correct, relevant=self.relevant)


def query_summary(correct: np.ndarray | Sequence[bool] | None, *, relevant: int | None = None) -> dict[str, Any]:
    """Recall@n-style numbers of one ranked result list (``correct``: right/wrong per rank).

    ``R@n`` for n in 1, 2, 4, 8 (up to k) is 1.0 when one of the first n results is right, as
    the dataset-level R@n averages; ``P@k`` is the share of right results; ``first_hit`` the
    1-based rank of the first right result (``None`` if none); ``AP@k`` the average precision
    over the k results (normalised by min(k, relevant) when ``relevant`` is known)."""
    if correct is None:
        return {"k": None, "hits": None, "P@k": None, "first_hit": None, "AP@k": None, "relevant": relevant}
    c = np.asarray(correct, dtype=bool).reshape(-1)
    k = len(c)
    out: dict[str, Any] = {"k": k, "relevant": relevant}
    for n in RECALL_KS:
        if n <= k:
            out[f"R@{n}"] = float(c[:n].any())
    hits = int(c.sum())
    out["hits"] = hits
    out["P@k"] = hits / k if k else float("nan")
    first = np.flatnonzero(c)
    out["first_hit"] = int(first[0]) + 1 if len(first) else None
    prec = np.cumsum(c) / np.arange(1, k + 1) if k else np.zeros(0)
    denom = min(k, relevant) if relevant is not None else hits
    out["AP@k"] = float((prec * c).sum() / denom) if denom > 0 else 0.0
    return out


def retrieve(
    index: RetrievalIndex,
    gallery_labels: np.ndarray,
    query: np.ndarray,
    k: int,
    *,
    query_label: int | None = None,
    exclude: int | None = None,
) -> QueryResult:
    """Search ``index`` (the gallery of ``gallery_labels``) for one query embedding ``(d,)``;
    ``exclude`` leaves that gallery index out (a query taken from the gallery)."""
    labels = np.asarray(gallery_labels, dtype=np.int64).reshape(-1)
    if len(labels) != index.size:
        raise ValueError(f"the index holds {index.size} items but {len(labels)} labels were given")
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    t0 = time.perf_counter()
    dist, idx = index.search(q, int(k), exclude=exclude)
    seconds = time.perf_counter() - t0
    keep = idx >= 0  # an approximate index may find fewer
    idx, dist = idx[keep], dist[keep]
    relevant = None
    if query_label is not None:
        relevant = int((labels == int(query_label)).sum())
        if exclude is not None and 0 <= exclude < len(labels) and labels[exclude] == int(query_label):
            relevant -= 1
    return QueryResult(
        indices=idx.astype(np.int64), distances=dist.astype(np.float32), labels=labels[idx],
        query_label=None if query_label is None else int(query_label),
        exclude=exclude, relevant=relevant, seconds=seconds,
    )


def slug(text: str) -> str:
    """``"Ankle boot"`` -> ``"ankle-boot"``, ``"T-shirt/top"`` -> ``"t-shirt-top"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass(frozen=True)
class SampleQuery:
    path: Path
    label: int | None  # class index in the given class names, when the name says it
    split: str | None  # the split and index the image was taken from, when the name says it
    index: int | None

    @property
    def name(self) -> str:
        return self.path.name


_SAMPLE_RE = re.compile(r"^(?P<cls>.+?)-(?P<split>train|val|test)(?P<index>\d+)$")


def parse_sample_name(filename: str, class_names: Sequence[str]) -> tuple[int | None, str | None, int | None]:
    """``(label, split, index)`` from a sample's file name ``<class>-<split><index>.<ext>``
    (``bag-test31374.png``): the class whose slug matches (``None`` if none of
    ``class_names`` does) and where the image came from. Also ``<class>.<ext>`` or
    ``<class>-anything.<ext>``: the label only."""
    stem = Path(filename).stem
    slugs = {slug(c): i for i, c in enumerate(class_names)}
    m = _SAMPLE_RE.match(stem)
    if m is not None:
        label = slugs.get(slug(m["cls"]))
        return label, m["split"], int(m["index"])
    s = slug(stem)
    if s in slugs:
        return slugs[s], None, None
    # the longest class slug that prefixes the name (``ankle-boot-2`` -> ankle-boot)
    best = max((c for c in slugs if s.startswith(c + "-")), key=len, default=None)
    return (slugs[best] if best is not None else None), None, None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def sample_queries(folder: str | Path, class_names: Sequence[str]) -> list[SampleQuery]:
    """The image files in ``folder`` (sorted by name), with what their names say."""
    d = Path(folder)
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            label, split, index = parse_sample_name(p.name, class_names)
            out.append(SampleQuery(p, label, split, index))
    return out


# -- the training form ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    """One ``TrainConfig`` field as a form widget."""

    name: str
    group: str
    kind: str  # choice | bool | int | float | str
    optional: bool  # None is allowed (= "the default" of the CLI)
    default: Any
    help: str
    choices: tuple[str, ...] | None
    min_value: int | float | None
    max_value: int | float | None
    step: int | float | None
    allowed: str  # the rule in words

    @property
    def label(self) -> str:
        return self.name


def _float_step(default: Any, low: float | None, high: float | None) -> float:
    ref = abs(float(default)) if isinstance(default, int | float) and default else 0.0
    if ref == 0.0:
        span = (high - low) if low is not None and high is not None else 1.0
        ref = min(1.0, span)
    return float(10.0 ** (math.floor(math.log10(ref)) - 1))


def config_fields() -> list[FieldSpec]:
    """Every ``TrainConfig`` field (in declaration order, so grouped as in ``GROUPS``) with
    the widget it needs: a choice for fields with choices, a toggle for booleans, a number
    input bounded by the rule (an open bound is the bound itself: the widget accepts it and
    validation refuses it, with the rule in the message), text for strings; ``optional``
    fields may be left at their default (None)."""
    hints = typing.get_type_hints(TrainConfig)
    out: list[FieldSpec] = []
    for f in dataclasses.fields(TrainConfig):
        rule = TrainConfig.rule(f.name)
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        kind = "choice" if rule.choices is not None else {bool: "bool", int: "int", float: "float"}.get(base, "str")
        lo, hi = rule.low, rule.high
        min_v: int | float | None
        max_v: int | float | None
        step: int | float | None
        if kind == "int":
            min_v = None if lo is None else int(math.floor(lo)) + (1 if rule.low_open else 0)
            max_v = None if hi is None else int(math.ceil(hi)) - (1 if rule.high_open else 0)
            step = 1
        elif kind == "float":
            min_v = None if lo is None else float(lo)
            max_v = None if hi is None else float(hi)
            step = _float_step(f.default, lo, hi)
        else:
            min_v = max_v = step = None
        out.append(FieldSpec(
            name=f.name, group=rule.group, kind=kind, optional=optional, default=f.default, help=rule.help,
            choices=rule.choices, min_value=min_v, max_value=max_v, step=step, allowed=rule.describe(),
        ))
    return out


def fields_by_group() -> dict[str, list[FieldSpec]]:
    out: dict[str, list[FieldSpec]] = {g: [] for g in GROUPS}
    for spec in config_fields():
        out.setdefault(spec.group, []).append(spec)
    return out


def form_values(preset: str | None = None) -> dict[str, Any]:
    """The value of every field: the defaults, overlaid by the preset's values (the preset is
    validated: a broken preset raises ``ConfigError``)."""
    from das_core.presets import get_preset

    cfg = TrainConfig() if preset is None else get_preset(preset).config()
    return cfg.to_dict()


def config_from_form(values: Mapping[str, Any]) -> TrainConfig:
    """A validated config from the form's values (``ConfigError`` names the field, value and
    rule). An optional field left empty (``None``, or blank text) takes its default."""
    flat: dict[str, Any] = {}
    specs = {s.name: s for s in config_fields()}
    for name, value in values.items():
        spec = specs.get(name)
        if spec is not None and spec.optional and isinstance(value, str):
            value = value.strip() or None
        flat[name] = value
    return TrainConfig.from_mapping(flat)


def cli_command(cfg: TrainConfig, *, skip: Sequence[str] = ("out",)) -> str:
    """The ``python -m das_core train`` command line of ``cfg``: a flag for every value that
    differs from the default (booleans as ``--x`` / ``--no-x``), fields in ``skip`` left out."""
    import shlex

    default = TrainConfig()
    parts = ["python -m das_core train"]
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name in skip or value == getattr(default, f.name) or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        else:
            parts.append(f"{flag} {shlex.quote(format(value, 'g') if isinstance(value, float) else str(value))}")
    return " ".join(parts)


def describe_config_error(exc: ConfigError) -> dict[str, str]:
    """The parts of a ``ConfigError`` to show next to the form."""
    from das_core.messages import clip

    return {"field": exc.field, "value": clip(exc.value), "allowed": exc.allowed}


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


# -- runs, curves and benchmarks ------------------------------------------------------------------


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """A checkpoint's config, metrics and epoch from its metadata alone (no tensors read);
    ``CheckpointError`` for a file that is not one of ours."""
    from das_core.checkpoint import parse_metadata, read_safetensors_header

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
        from das_core.io import read_jsonl

        p = Path(source)
        return read_jsonl(p / "metrics.jsonl" if p.is_dir() else p)
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
    metrics: Path | None,
) -> dict[str, Any]:
    last = _last_with(history, "test")
    test = _metrics(last, "test")
    done = max((_epoch(r) for r in history), default=0)
    row: dict[str, Any] = {
        "name": name,
        "kind": kind,
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
    job = read_json_object(run_dir / "job.json")
    if job is not None and isinstance(job.get("state"), str):
        return str(job["state"])
    progress = read_json_object(run_dir / "progress.json") or {}
    if (run_dir / "summary.json").is_file() or progress.get("state") == "done":
        return "done"
    done = max((_epoch(r) for r in history), default=0)
    return "done" if isinstance(planned, int) and done >= planned else "partial"


def _run_config(run_dir: Path, checkpoint: Path | None) -> dict[str, Any]:
    if (run_dir / "config.yaml").is_file():
        try:
            return load_config_file(run_dir / "config.yaml")
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


def _run_row(path: Path, checkpoint: Path | None, hist: list[dict[str, Any]]) -> dict[str, Any]:
    cfg = _run_config(path, checkpoint)
    summary = read_json_object(path / "summary.json") or {}
    sel: Mapping[str, Any] | None = None
    if any(isinstance(r.get("val"), dict) for r in hist):
        want = summary.get("selected_epoch")
        sel = next((r for r in hist if want is not None and r.get("epoch") == want), None)
        if sel is None:
            sel = _selected(hist, str(cfg.get("select_metric", "R@1")))
    return _row(path.name, "run", cfg, hist, sel, state=_run_state(path, hist, cfg.get("epochs")),
                checkpoint=checkpoint, path=path, metrics=path / "metrics.jsonl" if hist else None)


def run_row(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``runs_table`` row of one run folder (``None`` when it holds neither a checkpoint
    nor metrics yet)."""
    from das_core.checkpoint import RUN_FILES
    from das_core.io import read_jsonl

    d = Path(run_dir)
    checkpoint = next((d / n for n in RUN_FILES if (d / n).is_file()), None)
    hist = read_jsonl(d / "metrics.jsonl")
    if checkpoint is None and not hist:
        return None
    return _run_row(d, checkpoint, hist)


def runs_table(runs_root: str | Path | None = None, *, demos: Sequence[str | Path] | None = None) -> list[dict[str, Any]]:
    """One row per demo checkpoint (first) and per run folder under ``runs_root`` (newest
    first; folders with a checkpoint or metrics): name, kind (demo | run), dataset, DAS,
    loss, miner, backbone, dim, seed, epochs done / planned, state, the test metrics of the
    last evaluated epoch (``R@1`` ... ``F1``, fractions; ``test epoch``), and, when the run
    has a validation split, the selected epoch (best validation ``select_metric``, the one in
    ``best.safetensors``) and its test metrics (``sel. R@1`` ...); checkpoint and folder paths.

    A demo's metrics come from ``<name>.metrics.jsonl`` beside it (else from the checkpoint's
    own record) and its selected epoch is the checkpoint's epoch."""
    from das_core.runs import list_runs

    rows: list[dict[str, Any]] = []
    for d in demos or ():
        p = Path(d)
        try:
            info = checkpoint_info(p)
        except (ValueError, OSError):
            continue
        metrics_file = p.with_name(p.stem + ".metrics.jsonl")
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
    return rows


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


# -- two checkpoints on the same images -----------------------------------------------------------


def comparable(a: TrainConfig, b: TrainConfig, split: str) -> str | None:
    """``None`` when the two checkpoints' ``split`` holds the same images in the same order
    (so item ``i`` is the same image in both), else why not, in a sentence."""
    if a.dataset != b.dataset:
        return (f"the two checkpoints were trained on different datasets ({a.dataset} and {b.dataset}): "
                "their maps show different images and cannot be compared point by point")
    if (a.data_root or None) != (b.data_root or None) or a.train_classes != b.train_classes:
        return "the two checkpoints read the dataset from different folders or class splits"
    if split in ("train", "val"):
        keys = ("val_classes", "val_fraction") + (("seed",) if (a.val_classes or a.val_fraction) else ())
        diff = [k for k in keys if getattr(a, k) != getattr(b, k)]
        if diff:
            return (f"their {split} splits differ (the validation split is carved differently: "
                    f"{', '.join(f'{k} {getattr(a, k)} vs {getattr(b, k)}' for k in diff)}); "
                    "compare them on the test split")
    return None


def _own_class_share(emb: np.ndarray, labels: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """For each of ``rows``: the share of its ``n`` nearest neighbours (itself excluded, original
    embedding space) that have its label."""
    from das_core.index import search_exact

    if len(rows) == 0 or len(emb) < 2:
        return np.zeros(len(rows), np.float64)
    n = min(n, len(emb) - 1)
    _, idx = search_exact(emb, emb[rows], n + 1)
    idx = np.where(idx == rows[:, None], -1, idx)
    out = np.empty(len(rows), np.float64)
    for i, (r, nb) in enumerate(zip(rows, idx, strict=True)):
        nb = nb[nb >= 0][:n]
        out[i] = float((labels[nb] == labels[r]).mean()) if len(nb) else float("nan")
    return out


@dataclass(frozen=True)
class MapShift:
    aligned_b: np.ndarray  # (N, 2) map b rotated/scaled/translated onto map a
    displacement: np.ndarray  # (N,) distance between a and aligned b (unit map radius)
    moved: np.ndarray  # (k,) indices of the points that moved most, largest first
    rows: list[dict[str, Any]]  # one per moved point


def map_shift(
    a_coords: np.ndarray, b_coords: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *,
    emb_a: np.ndarray | None = None, emb_b: np.ndarray | None = None, k: int = 20, neighbours: int = 10,
) -> MapShift:
    """Map ``b`` aligned onto map ``a`` (orthogonal Procrustes over the same images in the same
    order, refitted without the 10 % of points that moved most), each point's displacement, and the ``k`` points that moved most with
    their class and, given both embeddings, the share of their ``neighbours`` nearest
    neighbours of their own class under each checkpoint (original spaces, not the maps):
    did the move bring the point among its class or away from it?"""
    from das_core.projection import align_to, displacement

    a = np.asarray(a_coords, dtype=np.float32)
    b = np.asarray(b_coords, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if a.shape != b.shape or a.shape[0] != len(y):
        raise ValueError(f"the maps ({a.shape}, {b.shape}) and labels ({len(y)}) must hold the same points")
    aligned = align_to(a, b)
    # refit without the 10 % that moved most, as ``displacement`` does: movers must not bend it
    d0 = np.linalg.norm(aligned - a, axis=1)
    keep = np.flatnonzero(d0 <= np.quantile(d0, 0.9)) if len(d0) else d0.astype(np.int64)
    if len(keep) >= 3:
        aligned = align_to(a, b, pairs=(keep, keep))
    disp = displacement(a, b)
    moved = np.argsort(-disp, kind="stable")[: max(0, int(k))].astype(np.int64)
    own_a = _own_class_share(np.asarray(emb_a, np.float32), y, moved, neighbours) if emb_a is not None else None
    own_b = _own_class_share(np.asarray(emb_b, np.float32), y, moved, neighbours) if emb_b is not None else None
    rows = []
    for j, i in enumerate(moved):
        row: dict[str, Any] = {
            "rank": j + 1, "index": int(i), "class": str(class_names[int(y[i])]),
            "displacement": round(float(disp[i]), 4),
        }
        if own_a is not None:
            row[f"own class in {neighbours}-NN (A)"] = round(float(own_a[j]), 3)
        if own_b is not None:
            row[f"own class in {neighbours}-NN (B)"] = round(float(own_b[j]), 3)
        rows.append(row)
    return MapShift(aligned_b=aligned, displacement=disp, moved=moved, rows=rows)


__all__ = [
    "METRICS",
    "FieldSpec",
    "MapShift",
    "QueryResult",
    "SampleQuery",
    "bench_summary",
    "cli_command",
    "checkpoint_info",
    "comparable",
    "config_fields",
    "config_from_form",
    "describe_config_error",
    "embed_images",
    "fields_by_group",
    "form_values",
    "format_seconds",
    "map_shift",
    "parse_sample_name",
    "progress_summary",
    "query_summary",
    "retrieve",
    "run_curves",
    "run_row",
    "runs_table",
    "sample_queries",
    "slug",
]
