"""Checkpoints: one ``.safetensors`` file per model, safe to share.

The file holds the network weights (``model.*``) and the criterion's state (``criterion.*``:
DAS frequency recorder and banks, proxies, the PDDM unit), and in its metadata the resolved
config, class names, dataset, preprocessing, metrics and code version. Writes are atomic
(temporary file, fsync, rename). Reading never unpickles untrusted data: safetensors holds
no code, and legacy ``.pt``/``.pth`` files are read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from das_core import code_version
from das_core.config import ConfigError, TrainConfig
from das_core.io import atomic_write
from das_core.models.preprocessing import Preprocessing

if TYPE_CHECKING:
    from das_core.das import DenselyAnchoredSampling
    from das_core.models import EmbeddingNet

FORMAT = "das-explorer-checkpoint"
FORMAT_VERSION = 1
LEGACY_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
RUN_FILES = ("best.safetensors", "last.safetensors")
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A file is missing, truncated, unsafe or not a DAS Explorer checkpoint. Names the file."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors plus what is needed to rebuild and describe the model."""

    path: Path
    config: TrainConfig
    class_names: list[str]
    dataset: str
    preprocessing: Preprocessing
    metrics: dict[str, Any]
    epoch: int
    code_version: str
    format_version: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        p = prefix + "."
        return {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}

    @property
    def has_das(self) -> bool:
        return "criterion.das.frequency" in self.tensors

    @property
    def name(self) -> str:
        """A short label: the run folder's name for run files, else the file stem."""
        if self.path.name in RUN_FILES:
            return f"{self.path.parent.name}/{self.path.stem}"
        return self.path.stem

    def build_model(self, device: str | torch.device = "cpu") -> EmbeddingNet:
        """The embedding network with these weights, in eval mode (no ImageNet download)."""
        from das_core.models import build_model

        model = build_model(self.config, pretrained=False)
        try:
            model.load_state_dict(self.state("model"))
        except RuntimeError as exc:
            raise CheckpointError(f"{self.path}: the weights do not fit the {self.config.backbone} model: {exc}") from exc
        model.preprocessing = self.preprocessing
        return model.to(device).eval()

    def build_das(self) -> DenselyAnchoredSampling | None:
        """The DAS module with its trained state, or ``None`` for a run trained without DAS."""
        if not self.has_das:
            return None
        from das_core.losses import build_das

        cfg = self.config if self.config.das else self.config.replace(das=True)
        das = build_das(cfg, len(self.class_names))
        assert das is not None
        state = self.state("criterion.das")
        try:
            das.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.path}: its DAS state does not fit: {exc}") from exc
        return das

    def summary(self) -> dict[str, Any]:
        c = self.config
        return {
            "path": str(self.path),
            "dataset": self.dataset,
            "backbone": c.backbone,
            "embedding_dim": c.embedding_dim,
            "loss": c.loss,
            "miner": c.miner,
            "das": c.das,
            "epoch": self.epoch,
            "seed": c.seed,
            "classes": len(self.class_names),
            "code_version": self.code_version,
        }


def _tensor_dict(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: store independent CPU copies.
    return {f"{prefix}.{k}": v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    config: TrainConfig,
    class_names: list[str],
    dataset: str,
    preprocessing: Preprocessing,
    criterion: torch.nn.Module | None = None,
    metrics: Mapping[str, Any] | None = None,
    epoch: int = 0,
    extra_meta: Mapping[str, str] | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file, fsync, rename) and return its path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: checkpoints are .safetensors files")
    tensors = _tensor_dict("model", model.state_dict())
    if criterion is not None:
        tensors.update(_tensor_dict("criterion", criterion.state_dict()))
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "code_version": code_version(),
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "class_names": json.dumps(list(class_names)),
        "dataset": dataset,
        "preprocessing": preprocessing.to_json(),
        "metrics": json.dumps(dict(metrics or {}), sort_keys=True, default=float),
        "epoch": str(int(epoch)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if extra_meta:
        meta.update({k: str(v) for k, v in extra_meta.items()})
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


# -- loading ----------------------------------------------------------------------------------


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A file as is; a run folder gives its ``best.safetensors`` (selected on validation) or
    else its ``last.safetensors``."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in RUN_FILES:
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p} is a folder without a checkpoint: expected {' or '.join(RUN_FILES)} in it")
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    return p


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking the file is whole."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short to be a checkpoint (truncated or empty)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or n < 2:
            raise CheckpointError(f"{path}: not a safetensors file (its first 8 bytes are not a header length)")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated: the header says {n} bytes but the file ends before")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CheckpointError(f"{path}: malformed safetensors header entry {key!r}") from exc
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated: its tensors need {8 + n + end} bytes but the file has {size} "
            "(an interrupted copy or download?)"
        )
    return header


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint file or run folder; raises ``CheckpointError`` naming the file when
    it is missing, truncated, unsafe or not one of ours."""
    p = resolve_checkpoint_path(path)
    if p.suffix in LEGACY_SUFFIXES:
        return _load_legacy(p)
    header = read_safetensors_header(p)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        names = [k for k in header if k != "__metadata__"]
        shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        raise CheckpointError(
            f"{p}: a safetensors file, but not a DAS Explorer checkpoint (no '{FORMAT}' format tag in its "
            f"metadata; {len(names)} tensors: {shown or 'none'}). Train one with `python -m das_core train`."
        )
    version = _int_meta(p, meta, "format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: written by DAS Explorer {meta.get('code_version', '?')} in checkpoint format {version}; "
            f"this version ({code_version()}) reads formats up to {FORMAT_VERSION}. Upgrade DAS Explorer."
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(p), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{p}: cannot read its tensors: {exc}") from exc
    meta, tensors = migrate(p, version, dict(meta), tensors)
    return _from_parts(p, meta, tensors)


def _int_meta(p: Path, meta: Mapping[str, str], key: str) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{p}: checkpoint metadata lacks a valid {key!r}") from exc


def _from_parts(p: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> Checkpoint:
    try:
        config = TrainConfig.from_mapping(json.loads(meta["config"]))
        class_names = list(json.loads(meta["class_names"]))
        prep = Preprocessing.from_json(meta["preprocessing"])
        metrics = json.loads(meta.get("metrics", "{}"))
    except (KeyError, json.JSONDecodeError, ConfigError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{p}: its metadata is incomplete or invalid ({exc})") from exc
    if not any(k.startswith("model.") for k in tensors):
        raise CheckpointError(f"{p}: holds no model weights")
    return Checkpoint(
        path=p,
        config=config,
        class_names=class_names,
        dataset=meta.get("dataset", config.dataset),
        preprocessing=prep,
        metrics=metrics,
        epoch=int(meta.get("epoch", "0")),
        code_version=meta.get("code_version", "?"),
        format_version=int(meta["format_version"]),
        tensors=tensors,
        meta=meta,
    )


# -- format versions --------------------------------------------------------------------------
# Format 0: the legacy torch-pickle layout of the first prototype, a dict
#   {"format": "das-explorer", "config": {...}, "class_names": [...], "dataset": str,
#    "preprocessing": {...}, "model": state_dict, "das": state_dict | None, "metrics": {...}}
# Format 1: this module's safetensors layout.
Migration = Callable[[dict[str, str], dict[str, torch.Tensor]], tuple[dict[str, str], dict[str, torch.Tensor]]]
MIGRATIONS: dict[int, Migration] = {}


def migrate(
    p: Path, version: int, meta: dict[str, str], tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Bring an older format up to ``FORMAT_VERSION`` through explicit, ordered steps."""
    while version < FORMAT_VERSION:
        step = MIGRATIONS.get(version)
        if step is None:
            raise CheckpointError(
                f"{p}: checkpoint format {version} (written by {meta.get('code_version', '?')}) has no "
                f"migration to format {FORMAT_VERSION}"
            )
        meta, tensors = step(meta, tensors)
        version += 1
        meta["format_version"] = str(version)
    return meta, tensors


def _load_legacy(p: Path) -> Checkpoint:
    """A ``.pt``/``.pth`` file: only plain tensors and containers are accepted
    (``weights_only=True``); anything that would run code on unpickling is refused."""
    import pickle

    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "disallowed object"
        raise CheckpointError(
            f"{p}: refused: this pickle holds objects that could run code when loaded ({first}). DAS Explorer "
            "only reads plain tensors from .pt/.pth files and never executes code from checkpoints; convert "
            "the model to .safetensors in a trusted environment"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{p}: not a readable PyTorch file (truncated or corrupt?): {exc}") from exc
    if not isinstance(obj, dict) or obj.get("format") != "das-explorer":
        kind = type(obj).__name__
        keys = ", ".join(list(map(str, obj))[:5]) if isinstance(obj, dict) else ""
        raise CheckpointError(
            f"{p}: a PyTorch file, but not a DAS Explorer checkpoint (a {kind}{' with keys ' + keys if keys else ''}). "
            "Train one with `python -m das_core train`."
        )
    meta, tensors = _legacy_to_v0_parts(p, obj)
    meta, tensors = migrate(p, 0, meta, tensors)
    return _from_parts(p, meta, tensors)


def _legacy_to_v0_parts(p: Path, obj: dict[str, Any]) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        meta = {
            "format": FORMAT,
            "format_version": "0",
            "code_version": str(obj.get("code_version", "0.0 (legacy .pt)")),
            "config": json.dumps(obj["config"]),
            "class_names": json.dumps(list(obj["class_names"])),
            "dataset": str(obj.get("dataset", obj["config"].get("dataset", "?"))),
            "preprocessing": json.dumps(obj["preprocessing"]),
            "metrics": json.dumps(obj.get("metrics", {})),
            "epoch": str(int(obj.get("epoch", 0))),
        }
        tensors = {f"model.{k}": v for k, v in obj["model"].items()}
        for k, v in (obj.get("das") or {}).items():
            tensors[f"das.{k}"] = v
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{p}: legacy DAS Explorer file with missing fields ({exc})") from exc
    if not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointError(f"{p}: legacy file holds non-tensor weights")
    return meta, tensors


def _migrate_0_to_1(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    # Format 0 kept DAS buffers at top level ("das.*"); format 1 keeps all criterion state
    # under "criterion.*" so proxies and PDDM weights travel too.
    moved = {(f"criterion.{k}" if k.startswith("das.") else k): v for k, v in tensors.items()}
    return meta, moved


MIGRATIONS[0] = _migrate_0_to_1
