"""The training loop: data -> model -> (DAS -> miner -> loss) -> optimiser, with per-epoch
evaluation on the validation and test classes, crash-safe checkpoints and exact resume.

Determinism: every epoch re-seeds torch's RNG from ``(seed, epoch)`` and the batch sampler
draws from ``(seed, epoch)``, so an epoch's batches, augmentations, DAS draws and mined
tuples depend only on the state at its start. ``--resume`` restarts from the last finished
epoch's model, criterion (DAS buffers, proxies, PDDM) and optimiser state and therefore
ends with the same metrics as an uninterrupted run on the CPU.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from das_core.checkpoint import save_checkpoint
from das_core.config import ConfigError, TrainConfig, check_path, dump_config, load_config_file
from das_core.data import ArrayDataset, DatasetSplits, DMLDataset, MPerClassBatchSampler, load_splits
from das_core.data.base import uint8_batch
from das_core.distributed import (
    barrier,
    context_from_env,
    device_for,
    gather_batch,
    init_distributed,
    shutdown,
)
from das_core.embed import auto_workers, embed_dataset, resolve_device
from das_core.io import append_jsonl, atomic_write, atomic_write_json, read_jsonl, truncate_jsonl
from das_core.losses import Criterion, build_criterion
from das_core.messages import clip
from das_core.models import EmbeddingNet, build_model
from das_core.models.preprocessing import Preprocessing

log = logging.getLogger("das_core.train")

TRAIN_STATE = "train_state.safetensors"
METRICS = "metrics.jsonl"
PROGRESS = "progress.json"
SUMMARY = "summary.json"
CONFIG = "config.yaml"


class TrainingError(RuntimeError):
    """Training cannot start or had to stop; the message says why and what was kept."""


@dataclass
class TrainResult:
    out_dir: Path
    last: dict[str, Any]
    selected_epoch: int | None
    history: list[dict[str, Any]]


EventHook = Callable[[dict[str, Any]], None]


def default_run_dir(cfg: TrainConfig) -> Path:
    from das_core.runs import default_runs_root

    tag = f"{cfg.dataset}-{cfg.loss}{'-das' if cfg.das else ''}-s{cfg.seed}"
    return default_runs_root() / f"{tag}-{time.strftime('%Y%m%d-%H%M%S')}"


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _check_output_dir(out: Path, need_bytes: int) -> None:
    """Fail before any work when the run folder cannot be written or the disk is full."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise TrainingError(f"cannot write to the run folder {out}: {exc.strerror or exc}; choose another --out") from exc
    free = shutil.disk_usage(out).free
    if free < need_bytes:
        raise TrainingError(
            f"only {free / 1e6:.0f} MB free on the disk of {out}, a run needs about {need_bytes / 1e6:.0f} MB "
            "(checkpoints and logs); free some space or choose another --out"
        )


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """The learning-rate multiplier of (1-based) ``epoch``, in closed form so that a resumed run
    needs no scheduler state. ``multistep`` is torch's ``MultiStepLR`` stepped once per epoch
    (the authors' ``scripts/standard.py``): ``lr_factor`` to the number of milestones ``<=
    epoch - 1`` (epochs already done); ``cosine`` is ``CosineAnnealingLR(T_max=epochs)``."""
    done = epoch - 1
    if cfg.lr_schedule == "multistep":
        return float(cfg.lr_factor ** sum(1 for m in cfg.milestones() if m <= done))
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done / cfg.epochs))
    return 1.0


def set_epoch_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epoch: int) -> float:
    """Set every parameter group's lr to its base lr times ``lr_factor``; returns the factor."""
    factor = lr_factor(cfg, epoch)
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
    return factor


def _optimizer(cfg: TrainConfig, model: EmbeddingNet, criterion: Criterion) -> torch.optim.Optimizer:
    groups: list[dict[str, Any]] = [
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr, "name": "model"}
    ]
    groups += criterion.param_groups(cfg)
    # Fused Adam (one multi-tensor kernel per step) when every parameter is on CUDA; the CPU
    # keeps the default implementation (same results as before).
    params = [p for g in groups for p in g["params"]]
    fused = True if params and all(p.device.type == "cuda" for p in params) else None
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.9, nesterov=True)


# -- train state (optimiser etc.) in safetensors: no pickles even for our own resume files -------


def _save_train_state(
    path: Path, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, info: dict[str, Any]
) -> None:
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    meta = {
        "param_groups": json.dumps(sd["param_groups"]),
        "scalars": json.dumps(scalars),
        "scaler": json.dumps(scaler.state_dict() if scaler is not None else None),
        "info": json.dumps(info),
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _load_train_state(
    path: Path, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> dict[str, Any]:
    """Restore the optimiser (and AMP scaler) from ``path`` and return its ``info``; a damaged
    or foreign file is a ``TrainingError`` (nothing in the run folder is changed)."""
    from safetensors import SafetensorError, safe_open

    try:
        state: dict[int, dict[str, Any]] = {}
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
            for key in fh.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = fh.get_tensor(key)
        for pid, values in json.loads(meta["scalars"]).items():
            state.setdefault(int(pid), {}).update(values)
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        scaler_state = json.loads(meta["scaler"])
        if scaler is not None and scaler_state:
            scaler.load_state_dict(scaler_state)
        info = json.loads(meta["info"])
        epoch, best, selected = info["epoch"], info.get("best_value", -math.inf), info.get("selected_epoch")
        if not (
            _is_epoch(epoch)
            and isinstance(best, int | float)
            and not isinstance(best, bool)
            and (selected is None or _is_epoch(selected))
        ):
            raise ValueError("its info holds no valid epoch, best_value and selected_epoch")
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, AttributeError, RuntimeError, RecursionError) as exc:
        raise TrainingError(
            f"cannot resume: {path} is damaged or not this run's ({type(exc).__name__}: {clip(str(exc), 150)[1:-1]}). "
            "Nothing was changed; start a new run with another --out (its checkpoints stay usable)"
        ) from exc
    return {"epoch": epoch, "best_value": float(best), "selected_epoch": selected}


def _is_epoch(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 10**7


def _check_metrics_file(path: Path) -> None:
    """Every complete line of ``metrics.jsonl`` must name its epoch (a whole number): resume
    keeps the lines of the epochs it does not recompute and drops the others."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise TrainingError(f"cannot resume: cannot read {path}: {exc.strerror or exc}") from exc
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            rec = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            continue  # a torn line from a killed writer: read_jsonl skips it
        if isinstance(rec, dict) and not _is_epoch(rec.get("epoch")):
            raise TrainingError(
                f"cannot resume: line {number} of {path} has epoch {clip(rec.get('epoch'))}, not a whole number. "
                "Nothing was changed; fix or delete that line, then resume"
            )


# Files training writes with das_core.io.atomic_write: a kill leaves ``.<name>.<random>.tmp``.
_WRITTEN = ("last.safetensors", "best.safetensors", TRAIN_STATE, METRICS, PROGRESS, SUMMARY, CONFIG)


def _remove_stale_temporaries(out: Path) -> None:
    for name in _WRITTEN:
        for tmp in out.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted write", tmp.name)


# -- evaluation ---------------------------------------------------------------------------------


def evaluate_split(
    model: EmbeddingNet,
    dataset: DMLDataset,
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
) -> dict[str, float]:
    from das_core.evaluation import evaluate_embeddings

    emb, labels = embed_dataset(model, dataset, batch_size=batch_size, device=device, num_workers=num_workers)
    return evaluate_embeddings(emb, labels)


# -- the loop ---------------------------------------------------------------------------------


def resolve_resume_config(out: Path, overrides: dict[str, Any]) -> TrainConfig:
    """The saved config of the run in ``out`` with ``overrides`` (e.g. more epochs) applied."""
    check_path("out", str(out))
    saved = out / CONFIG
    if not saved.is_file():
        raise TrainingError(f"nothing to resume in {out}: it has no {CONFIG} (start a new run without --resume)")
    try:
        base = TrainConfig.from_mapping(load_config_file(saved))
    except ConfigError as exc:
        raise TrainingError(f"cannot resume: the run's {saved} is not a valid config: {exc}") from exc
    return base.replace(**overrides, out=str(out)) if overrides else base.replace(out=str(out))


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    show_progress: bool | None = None,
    on_event: EventHook | None = None,
) -> TrainResult:
    """Train ``cfg`` into its run folder and return the metrics of every epoch."""
    cfg.validate()
    out = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    cfg = cfg.replace(out=str(out)) if cfg.out != str(out) else cfg
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    state_file = out / TRAIN_STATE
    if resume and not state_file.is_file():
        if (out / "last.safetensors").is_file():
            raise TrainingError(f"{out} has a checkpoint but no {TRAIN_STATE}; it cannot be resumed exactly")
        log.info("nothing finished yet in %s: starting from epoch 1", out)
    if not resume and ((out / "last.safetensors").exists() or state_file.exists()):
        raise TrainingError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out (nothing was changed)"
        )

    ctx = context_from_env()
    device = device_for(ctx, resolve_device(cfg.device))
    init_distributed(ctx, device)
    main = ctx.is_main  # only rank 0 writes files and evaluates
    torch.manual_seed(cfg.seed)

    # Data first: a wrong layout or an impossible batch is refused before any model is built.
    splits = load_splits(
        cfg.dataset,
        cfg.data_root,
        train_classes=cfg.train_classes,
        val_classes=cfg.val_classes,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        image_size=cfg.image_size,
    )
    for note in splits.notes:
        log.warning(note)
    if splits.name != cfg.dataset:
        cfg = cfg.replace(dataset=splits.name)
    num_workers = auto_workers(device, cfg.num_workers)
    sampler = MPerClassBatchSampler(
        splits.train.labels,
        cfg.batch_size,
        cfg.samples_per_class,
        num_batches=cfg.steps_per_epoch,
        seed=cfg.seed,
        rank=ctx.rank,
        replacement=cfg.class_sampling == "replacement",
    )

    model = build_model(cfg).to(device)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net: torch.nn.Module = model  # what the loop calls: DDP-wrapped under torchrun
    if ctx.enabled and device.type == "cuda":
        # BatchNorm statistics over the global batch, as one process would compute them
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]
        net = model
    if ctx.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    criterion = build_criterion(cfg, splits.train.num_classes).to(device)
    optimizer = _optimizer(cfg, model, criterion)
    from das_core.diagnostics import DASDiagnostics, weight_norms

    diag = DASDiagnostics(cfg.das_diagnostics_steps) if cfg.das and cfg.das_diagnostics_steps and main else None
    criterion.diagnostics = diag
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None

    n_params = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in criterion.parameters())
    if main:
        _check_output_dir(out, need_bytes=n_params * 4 * 6 + 20_000_000)
    barrier(ctx)

    start_epoch = 1
    best_value = -math.inf
    selected_epoch: int | None = None
    if resume:
        _check_metrics_file(out / METRICS)
    if resume and state_file.is_file():
        from das_core.checkpoint import load_checkpoint

        ckpt = load_checkpoint(out / "last.safetensors")
        try:
            model.load_state_dict(ckpt.state("model"))
            criterion.load_state_dict(ckpt.state("criterion"))
        except RuntimeError as exc:
            raise TrainingError(
                f"cannot resume: the checkpoint in {out} does not fit the model of this config (an option that "
                f"shapes the model, such as --embedding-dim or --backbone, was changed, or {CONFIG} was edited): "
                f"{clip(str(exc), 200)[1:-1]}. Nothing was changed; resume with the run's own options"
            ) from exc
        info = _load_train_state(state_file, optimizer, scaler)
        if info["epoch"] != ckpt.epoch:
            raise TrainingError(
                f"cannot resume: {TRAIN_STATE} is from epoch {info['epoch']} but last.safetensors from epoch "
                f"{ckpt.epoch} (the run was killed while saving). Nothing was changed; start a new run"
            )
        start_epoch = info["epoch"] + 1
        best_value = info["best_value"]
        selected_epoch = info["selected_epoch"]
        log.info("resuming %s after epoch %d", out, start_epoch - 1)
    if resume and main:
        # Lines of epochs that will be recomputed go, also when no epoch had finished saving
        # (a kill after the first metrics line, before train_state.safetensors existed).
        truncate_jsonl(out / METRICS, lambda r: _is_epoch(r.get("epoch")) and r["epoch"] < start_epoch)
    if main:
        _remove_stale_temporaries(out)
    if not resume and main:
        (out / METRICS).unlink(missing_ok=True)
    if main:
        dump_config(cfg, out / CONFIG)
    barrier(ctx)

    augment = torch.Generator(device=device)
    loader = make_train_batches(splits.train, model.preprocessing, sampler, device, num_workers, augment)
    steps = len(sampler)
    emit = (on_event or (lambda event: None)) if main else (lambda event: None)
    started = time.time()
    history = read_jsonl(out / METRICS)
    emit({"event": "start", "out": str(out), "device": str(device), "epochs": cfg.epochs, "steps": steps})
    log.info(
        "training %s on %s: %d train images / %d classes, %d steps per epoch, %d epochs, device %s%s",
        cfg.loss,
        splits.name,
        len(splits.train),
        splits.train.num_classes,
        steps,
        cfg.epochs,
        device,
        f", rank {ctx.rank} of {ctx.world_size} (global batch {ctx.world_size * cfg.batch_size})" if ctx.enabled else "",
    )

    for epoch in range(start_epoch, cfg.epochs + 1):
        # The global RNG (DAS draws, miners) is the same on every rank; augmentation draws
        # from a generator of its own, different per rank.
        torch.manual_seed(epoch_seed(cfg.seed, epoch))
        augment.manual_seed(epoch_seed(cfg.seed, epoch) + ctx.rank)
        sampler.set_epoch(epoch)
        set_epoch_lr(optimizer, cfg, epoch)
        if diag is not None:
            diag.start_epoch(len(sampler))
        model.train()
        criterion.train()
        loss_sum = torch.zeros((), device=device)
        bad_step = torch.full((), -1, dtype=torch.long, device=device)
        epoch_start = time.time()
        last_report = 0.0
        bar = _progress_bar(steps, epoch, cfg.epochs, show_progress)
        for step, (x, y) in enumerate(loader(), start=1):
            if device.type == "cuda" and cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                emb = net(x)
            emb, y = gather_batch(ctx, emb.float(), y)  # the global batch on every rank
            loss = criterion(emb, y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            detached = loss.detach()
            finite = torch.isfinite(detached)
            # a Python scalar, not torch.tensor(step, device=...): that copy would sync every step
            bad_step = torch.where(~finite & (bad_step < 0), step, bad_step)
            loss_sum += torch.where(finite, detached, torch.zeros_like(detached))
            now = time.time()
            # once a second, and at each epoch's first and last step (so that an epoch shorter
            # than a second still shows up in progress.json while it runs)
            if now - last_report >= 1.0 or step == 1 or step == steps:
                last_report = now
                first_bad = int(bad_step)  # a host sync once a second, not every step
                if first_bad >= 0:
                    raise TrainingError(
                        f"the loss became {float(detached):.4g} (not finite) at epoch {epoch}, step {first_bad}; "
                        f"training stopped. The last good checkpoint is kept in {out} (epoch {epoch - 1}). "
                        "Lower --lr, or check the data for broken images."
                    )
                mean_loss = float(loss_sum) / step
                elapsed = now - epoch_start
                eta = elapsed / step * (steps - step) + elapsed / step * steps * (cfg.epochs - epoch)
                progress = {
                    "state": "training",
                    "epoch": epoch,
                    "epochs": cfg.epochs,
                    "step": step,
                    "steps": steps,
                    "loss": mean_loss,
                    "elapsed": now - started,
                    "eta": eta,
                    "device": str(device),
                    "updated": now,
                }
                if main:
                    atomic_write_json(out / PROGRESS, progress)
                emit({"event": "step", **progress})
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        train_loss = float(loss_sum) / max(1, steps)

        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": train_loss,
            "lr": optimizer.param_groups[0]["lr"],
            "time": time.time() - epoch_start,
        }
        record["weight_norm"] = weight_norms(model)
        if diag is not None:
            record["das_diagnostics"] = diag.summary()
        if not main:  # rank 0 evaluates and writes; the others wait for it
            barrier(ctx)
            continue
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            atomic_write_json(out / PROGRESS, {**_read_progress(out), "state": "evaluating", "updated": time.time()})
            for name, split in (("val", splits.val), ("test", splits.test)):
                if split is not None:
                    record[name] = evaluate_split(
                        model, split, batch_size=cfg.eval_batch_size, device=device, num_workers=num_workers
                    )
        append_jsonl(out / METRICS, record)
        history.append(record)
        log.info("epoch %d/%d  %s", epoch, cfg.epochs, format_record(record))
        emit({"event": "epoch", **record})

        ckpt_kw: dict[str, Any] = {
            "model": model,
            "criterion": criterion,
            "config": cfg,
            "class_names": splits.train.class_names,
            "dataset": splits.name,
            "preprocessing": model.preprocessing,
            "metrics": record,
            "epoch": epoch,
        }
        save_checkpoint(out / "last.safetensors", **ckpt_kw)
        if "val" in record and record["val"][cfg.select_metric] > best_value:
            best_value = record["val"][cfg.select_metric]
            selected_epoch = epoch
            save_checkpoint(out / "best.safetensors", **ckpt_kw)
        _save_train_state(
            state_file,
            optimizer,
            scaler,
            {"epoch": epoch, "best_value": best_value, "selected_epoch": selected_epoch},
        )
        barrier(ctx)

    last = history[-1] if history else {}
    if not main:
        shutdown(ctx)
        return TrainResult(out_dir=out, last=last, selected_epoch=selected_epoch, history=history)
    summary = {
        "last_epoch": last.get("epoch"),
        "last": last,
        "select_metric": cfg.select_metric,
        "selected_epoch": selected_epoch,
        "selected": next((r for r in history if r.get("epoch") == selected_epoch), None),
        "best_test_epoch": best_test_epoch(history, cfg.select_metric),
        "dataset": splits.name,
        "device": str(device),
        "seconds": time.time() - started,
    }
    atomic_write_json(out / SUMMARY, summary)
    atomic_write_json(out / PROGRESS, {**_read_progress(out), "state": "done", "updated": time.time()})
    emit({"event": "done", "out": str(out)})
    shutdown(ctx)
    return TrainResult(out_dir=out, last=last, selected_epoch=selected_epoch, history=history)


BEST_TEST_NOTE = (
    "best epoch ON THE TEST SET, as the authors' code reports (utilities/logger.py:59): for a like-for-like "
    "comparison with the paper only; it is not a model selection (use 'selected' or 'last')"
)


def best_test_epoch(history: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The epoch with the highest test ``metric`` (the first on ties), clearly labelled: the
    paper's numbers are selected this way, this project's tables never are."""
    scored = [r for r in history if isinstance(r.get("test"), dict) and metric in r["test"]]
    if not scored:
        return None
    best = max(scored, key=lambda r: (r["test"][metric], -int(r["epoch"])))
    return {
        "epoch": best["epoch"],
        "metric": metric,
        "value": best["test"][metric],
        "test": best["test"],
        "note": BEST_TEST_NOTE,
    }


def make_train_batches(
    dataset: DMLDataset,
    prep: Preprocessing,
    sampler: MPerClassBatchSampler,
    device: torch.device,
    num_workers: int,
    augment: torch.Generator | None = None,
) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """An iterator factory of augmented ``(images, labels)`` batches on ``device``.

    In-memory uint8 datasets (Fashion-MNIST, digits) are indexed and augmented a whole
    batch at a time on the device (per-image torchvision transforms cost ~1 ms per image
    here, more than the small CNN's own step); file datasets decode and augment per image
    in DataLoader workers."""
    channels = 1 if isinstance(dataset, ArrayDataset) and dataset.images.ndim == 3 else 3
    if isinstance(dataset, ArrayDataset) and prep.supports_batch(channels):

        def in_memory() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            labels = torch.from_numpy(dataset.labels)
            for idx in sampler:
                index = torch.as_tensor(idx)
                x = uint8_batch(dataset, idx).to(device, non_blocking=True)
                yield prep.train_batch(x, augment), labels[index].to(device, non_blocking=True)

        return in_memory
    loader = torch.utils.data.DataLoader(
        dataset.with_transform(prep.train_transform()),
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )

    def from_files() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    return from_files


def _read_progress(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / PROGRESS).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _progress_bar(steps: int, epoch: int, epochs: int, show: bool) -> Any:
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True)


def format_record(record: dict[str, Any]) -> str:
    parts = [f"loss {record.get('train_loss', float('nan')):.4f}"]
    for split in ("val", "test"):
        m = record.get(split)
        if m:
            parts.append(f"{split} R@1 {m['R@1']:.4f} MAP@R {m['MAP@R']:.4f} NMI {m['NMI']:.4f}")
    return "  ".join(parts)


def load_splits_for(cfg: TrainConfig, data_root: str | None = None) -> DatasetSplits:
    """The dataset splits a checkpoint's config was trained on (optionally from another folder)."""
    return load_splits(
        cfg.dataset,
        data_root if data_root is not None else cfg.data_root,
        train_classes=cfg.train_classes,
        val_classes=cfg.val_classes,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        image_size=cfg.image_size,
    )
