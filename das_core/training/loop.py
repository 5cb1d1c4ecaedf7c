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

from das_core.data import ArrayDataset, DatasetSplits, DMLDataset, MPerClassBatchSampler
from das_core.data.base import uint8_batch
from das_core.messages import clip
from das_core.models import EmbeddingNet, build_model
from das_core.models.embed import auto_workers, embed_dataset
from das_core.models.preprocessing import Preprocessing
from das_core.runtime import resolve_device
from das_core.store.checkpoint import save_checkpoint
from das_core.store.io import append_jsonl, atomic_write, atomic_write_json, read_jsonl, truncate_jsonl
from das_core.store.layout import RunLayout
from das_core.training.config import ConfigError, TrainConfig, check_path, dump_config, load_config_file
from das_core.training.distributed import (
    barrier,
    context_from_env,
    device_for,
    gather_batch,
    init_distributed,
    shutdown,
)
from das_core.training.losses import Criterion, build_criterion

log = logging.getLogger("das_core.train")



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
    from das_core.store.runs import default_runs_root

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
        return float(cfg.lr_factor ** sum(1 for m in cfg.lr_milestones if m <= done))
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




def _remove_stale_temporaries(out: Path) -> None:
    # files training writes with das_core.store.io.atomic_write: a kill leaves ``.<name>.<random>.tmp``
    for written in RunLayout(out).atomic_files():
        for tmp in out.glob(f".{written.name}.*.tmp"):
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
    from das_core.retrieval.evaluation import evaluate_embeddings

    emb, labels = embed_dataset(model, dataset, batch_size=batch_size, device=device, num_workers=num_workers)
    return evaluate_embeddings(emb, labels)


# -- the loop ---------------------------------------------------------------------------------


def resolve_resume_config(out: Path, overrides: dict[str, Any]) -> TrainConfig:
    """The saved config of the run in ``out`` with ``overrides`` (e.g. more epochs) applied."""
    check_path("out", str(out))
    saved = RunLayout(out).config
    if not saved.is_file():
        raise TrainingError(f"nothing to resume in {out}: it has no {saved.name} (start a new run without --resume)")
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
    return Trainer(cfg, resume=resume, show_progress=show_progress, on_event=on_event).run()


@dataclass
class Selection:
    """Where a run stands between epochs: the next epoch and the validation-selected one."""

    start_epoch: int = 1
    best_value: float = -math.inf
    selected_epoch: int | None = None


class Trainer:
    """One training run in steps: ``Trainer(cfg)`` checks the run folder and builds the data,
    model, criterion and optimiser (``setup``); ``restore`` continues a run (``--resume``);
    ``train_epoch`` runs one epoch's steps; ``end_epoch`` evaluates and writes its record;
    ``save_epoch`` writes the checkpoints and the train state; ``finish`` writes the summary.
    ``run`` chains them; ``train(cfg)`` is ``Trainer(cfg).run()``.

    Every random draw happens in the order of the single function this class replaced, so
    the results are the same bit for bit."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        show_progress: bool | None = None,
        on_event: EventHook | None = None,
    ) -> None:
        self.cfg = _prepare_run_folder(cfg, resume)
        self.out = Path(str(self.cfg.out))
        self.layout = RunLayout(self.out)
        self.resume = resume
        self.show_progress = sys.stderr.isatty() if show_progress is None else show_progress
        self._on_event = on_event
        self.setup()

    @property
    def state_file(self) -> Path:
        return self.layout.train_state

    # -- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        """Device (and process group), data, sampler, model, criterion, optimiser, AMP; then the
        run folder is checked for space."""
        cfg = self.cfg
        self.ctx = ctx = context_from_env()
        self.device = device = device_for(ctx, resolve_device(cfg.device))
        init_distributed(ctx, device)
        self.main = ctx.is_main  # only rank 0 writes files and evaluates
        torch.manual_seed(cfg.seed)

        # Data first: a wrong layout or an impossible batch is refused before any model is built.
        self.splits = splits = load_splits_for(cfg)
        for note in splits.notes:
            log.warning(note)
        if splits.name != cfg.dataset:
            self.cfg = cfg = cfg.replace(dataset=splits.name)
        self.num_workers = auto_workers(device, cfg.num_workers)
        self.sampler = MPerClassBatchSampler(
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
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None
            )
        self.model: EmbeddingNet = model
        self.net = net
        self.criterion = criterion = build_criterion(cfg, splits.train.num_classes).to(device)
        self.optimizer = _optimizer(cfg, model, criterion)
        from das_core.training.diagnostics import DASDiagnostics

        self.diag = DASDiagnostics(cfg.das_diagnostics_steps) if cfg.das and cfg.das_diagnostics_steps and self.main else None
        criterion.diagnostics = self.diag
        self.use_amp = cfg.amp and device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp and self.amp_dtype == torch.float16 else None

        n_params = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in criterion.parameters())
        if self.main:
            _check_output_dir(self.out, need_bytes=n_params * 4 * 6 + 20_000_000)
        barrier(ctx)

    # -- resume ---------------------------------------------------------------------------------
    def restore(self) -> Selection:
        """With ``--resume``: the model, criterion and optimiser of the last finished epoch, and the
        metrics lines up to it. Then the run folder is tidied and the config written."""
        out, sel = self.out, Selection()
        if self.resume:
            _check_metrics_file(self.layout.history)
        if self.resume and self.state_file.is_file():
            from das_core.store.checkpoint import load_checkpoint

            ckpt = load_checkpoint(self.layout.last)
            try:
                self.model.load_state_dict(ckpt.state("model"))
                self.criterion.load_state_dict(ckpt.state("criterion"))
            except RuntimeError as exc:
                raise TrainingError(
                    f"cannot resume: the checkpoint in {out} does not fit the model of this config (an option that "
                    f"shapes the model, such as --embedding-dim or --backbone, was changed, or {self.layout.config.name} was edited): "
                    f"{clip(str(exc), 200)[1:-1]}. Nothing was changed; resume with the run's own options"
                ) from exc
            info = _load_train_state(self.state_file, self.optimizer, self.scaler)
            if info["epoch"] != ckpt.epoch:
                raise TrainingError(
                    f"cannot resume: {self.state_file.name} is from epoch {info['epoch']} but {self.layout.last.name} from epoch "
                    f"{ckpt.epoch} (the run was killed while saving). Nothing was changed; start a new run"
                )
            sel = Selection(info["epoch"] + 1, info["best_value"], info["selected_epoch"])
            log.info("resuming %s after epoch %d", out, sel.start_epoch - 1)
        if self.resume and self.main:
            # Lines of epochs that will be recomputed go, also when no epoch had finished saving
            # (a kill after the first metrics line, before train_state.safetensors existed).
            start = sel.start_epoch
            truncate_jsonl(self.layout.history, lambda r: _is_epoch(r.get("epoch")) and r["epoch"] < start)
        if self.main:
            _remove_stale_temporaries(out)
        if not self.resume and self.main:
            self.layout.history.unlink(missing_ok=True)
        if self.main:
            dump_config(self.cfg, self.layout.config)
        barrier(self.ctx)
        return sel

    def emit(self, event: dict[str, Any]) -> None:
        if self.main and self._on_event is not None:
            self._on_event(event)

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, ctx, out = self.cfg, self.ctx, self.out
        sel = self.restore()
        self.augment = torch.Generator(device=self.device)
        self.loader = make_train_batches(
            self.splits.train, self.model.preprocessing, self.sampler, self.device, self.num_workers, self.augment
        )
        self.steps = steps = len(self.sampler)
        self.started = time.time()
        history = read_jsonl(self.layout.history)
        from das_core.training.observers import EpochObserver, observers_for

        self.observers: list[EpochObserver] = observers_for(self) if self.main else []
        for observer in self.observers:
            observer.start(self, sel.start_epoch)
        self.emit({"event": "start", "out": str(out), "device": str(self.device), "epochs": cfg.epochs, "steps": steps})
        log.info(
            "training %s on %s: %d train images / %d classes, %d steps per epoch, %d epochs, device %s%s",
            cfg.loss,
            self.splits.name,
            len(self.splits.train),
            self.splits.train.num_classes,
            steps,
            cfg.epochs,
            self.device,
            f", rank {ctx.rank} of {ctx.world_size} (global batch {ctx.world_size * cfg.batch_size})"
            if ctx.enabled
            else "",
        )
        try:
            for epoch in range(sel.start_epoch, cfg.epochs + 1):
                epoch_start = time.time()
                train_loss = self.train_epoch(epoch, epoch_start)
                record = self.epoch_record(epoch, train_loss, epoch_start)
                if not self.main:  # rank 0 evaluates and writes; the others wait for it
                    barrier(ctx)
                    continue
                self.end_epoch(record)
                history.append(record)
                self.save_epoch(record, sel)
                for observer in self.observers:
                    observer.epoch(self, record)
                barrier(ctx)
        finally:
            for observer in self.observers:
                observer.close()
        return self.finish(history, sel)

    def train_epoch(self, epoch: int, epoch_start: float) -> float:
        """One epoch's steps (re-seeded from ``(seed, epoch)``); returns the mean training loss.
        Writes progress.json about once a second and stops on a non-finite loss."""
        cfg, ctx, device, out, steps = self.cfg, self.ctx, self.device, self.out, self.steps
        model, criterion, optimizer, scaler = self.model, self.criterion, self.optimizer, self.scaler
        # The global RNG (DAS draws, miners) is the same on every rank; augmentation draws
        # from a generator of its own, different per rank.
        torch.manual_seed(epoch_seed(cfg.seed, epoch))
        self.augment.manual_seed(epoch_seed(cfg.seed, epoch) + ctx.rank)
        self.sampler.set_epoch(epoch)
        set_epoch_lr(optimizer, cfg, epoch)
        if self.diag is not None:
            self.diag.start_epoch(len(self.sampler))
        model.train()
        criterion.train()
        loss_sum = torch.zeros((), device=device)
        bad_step = torch.full((), -1, dtype=torch.long, device=device)
        last_report = 0.0
        bar = _progress_bar(steps, epoch, cfg.epochs, self.show_progress)
        for step, (x, y) in enumerate(self.loader(), start=1):
            if device.type == "cuda" and cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                emb = self.net(x)
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
                    "elapsed": now - self.started,
                    "eta": eta,
                    "device": str(device),
                    "updated": now,
                }
                if self.main:
                    atomic_write_json(self.layout.progress, progress)
                self.emit({"event": "step", **progress})
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return float(loss_sum) / max(1, steps)

    def epoch_record(self, epoch: int, train_loss: float, epoch_start: float) -> dict[str, Any]:
        """The epoch's line of metrics.jsonl before evaluation (every rank computes it)."""
        from das_core.training.diagnostics import das_state, weight_norms

        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": train_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "time": time.time() - epoch_start,
        }
        record["weight_norm"] = weight_norms(self.model)
        if self.diag is not None:
            record["das_diagnostics"] = self.diag.summary()
        if self.criterion.das is not None:
            record["das_state"] = das_state(self.criterion.das)
        return record

    def end_epoch(self, record: dict[str, Any]) -> None:
        """Rank 0: evaluate on the validation and test classes when due, append the record to
        metrics.jsonl, log it and tell the listener."""
        cfg, out, epoch = self.cfg, self.out, int(record["epoch"])
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            atomic_write_json(self.layout.progress, {**_read_progress(out), "state": "evaluating", "updated": time.time()})
            for name, split in (("val", self.splits.val), ("test", self.splits.test)):
                if split is not None:
                    record[name] = evaluate_split(
                        self.model,
                        split,
                        batch_size=cfg.eval_batch_size,
                        device=self.device,
                        num_workers=self.num_workers,
                    )
        append_jsonl(self.layout.history, record)
        log.info("epoch %d/%d  %s", epoch, cfg.epochs, format_record(record))
        self.emit({"event": "epoch", **record})

    def save_epoch(self, record: dict[str, Any], sel: Selection) -> None:
        """Rank 0: last.safetensors, best.safetensors when the validation metric improved, and the
        train state that ``--resume`` continues from (written last: it marks the epoch done)."""
        cfg, epoch = self.cfg, int(record["epoch"])
        ckpt_kw: dict[str, Any] = {
            "model": self.model,
            "criterion": self.criterion,
            "config": cfg,
            "class_names": self.splits.train.class_names,
            "dataset": self.splits.name,
            "preprocessing": self.model.preprocessing,
            "metrics": record,
            "epoch": epoch,
        }
        save_checkpoint(self.layout.last, **ckpt_kw)
        if "val" in record and record["val"][cfg.select_metric] > sel.best_value:
            sel.best_value = record["val"][cfg.select_metric]
            sel.selected_epoch = epoch
            save_checkpoint(self.layout.best, **ckpt_kw)
        _save_train_state(
            self.state_file,
            self.optimizer,
            self.scaler,
            {"epoch": epoch, "best_value": sel.best_value, "selected_epoch": sel.selected_epoch},
        )

    def finish(self, history: list[dict[str, Any]], sel: Selection) -> TrainResult:
        """Rank 0 writes summary.json and the final progress; every rank leaves the process group."""
        cfg, out = self.cfg, self.out
        last = history[-1] if history else {}
        result = TrainResult(out_dir=out, last=last, selected_epoch=sel.selected_epoch, history=history)
        if not self.main:
            shutdown(self.ctx)
            return result
        summary = {
            "last_epoch": last.get("epoch"),
            "last": last,
            "select_metric": cfg.select_metric,
            "selected_epoch": sel.selected_epoch,
            "selected": next((r for r in history if r.get("epoch") == sel.selected_epoch), None),
            "best_test_epoch": best_test_epoch(history, cfg.select_metric),
            "dataset": self.splits.name,
            "device": str(self.device),
            "seconds": time.time() - self.started,
        }
        atomic_write_json(self.layout.summary, summary)
        atomic_write_json(self.layout.progress, {**_read_progress(out), "state": "done", "updated": time.time()})
        self.emit({"event": "done", "out": str(out)})
        shutdown(self.ctx)
        return result


def _prepare_run_folder(cfg: TrainConfig, resume: bool) -> TrainConfig:
    """The validated config with its run folder filled in; refuses to start over a finished
    run without ``--resume`` and to resume a checkpoint that has no train state."""
    cfg.validate()
    out = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    cfg = cfg.replace(out=str(out)) if cfg.out != str(out) else cfg
    run = RunLayout(out)
    state_file = run.train_state
    if resume and not state_file.is_file():
        if run.last.is_file():
            raise TrainingError(f"{out} has a checkpoint but no {state_file.name}; it cannot be resumed exactly")
        log.info("nothing finished yet in %s: starting from epoch 1", out)
    if not resume and (run.last.exists() or state_file.exists()):
        raise TrainingError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out (nothing was changed)"
        )
    return cfg


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
        data = json.loads(RunLayout(out).progress.read_text())
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
    """The dataset splits a checkpoint's config was trained on (optionally from another folder):
    :meth:`TrainConfig.split_spec` loaded."""
    return cfg.split_spec(data_root).load()
