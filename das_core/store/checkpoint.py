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
from das_core.messages import clip
from das_core.models.preprocessing import Preprocessing
from das_core.store.io import atomic_write, file_key
from das_core.store.layout import CHECKPOINTS, RunLayout, is_run_checkpoint
from das_core.training.config import ConfigError, TrainConfig

if TYPE_CHECKING:
    from das_core.models import EmbeddingNet
    from das_core.training.das import DenselyAnchoredSampling

FORMAT = "das-explorer-checkpoint"
FORMAT_VERSION = 1
LEGACY_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
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
    # What the file held when it was loaded (``checkpoint_identity``): the key of everything
    # derived from these weights (embeddings, maps, indexes, thumbnails).
    identity: str = ""

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        p = prefix + "."
        return {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}

    @property
    def has_das(self) -> bool:
        return "criterion.das.frequency" in self.tensors

    @property
    def name(self) -> str:
        """A short label: the run folder's name for run files, else the file stem."""
        if is_run_checkpoint(self.path):
            return f"{self.path.parent.name}/{self.path.stem}"
        return self.path.stem

    def build_model(self, device: str | torch.device = "cpu") -> EmbeddingNet:
        """The embedding network with these weights, in eval mode (no ImageNet download)."""
        from das_core.models import build_model

        model = build_model(self.config, pretrained=False)
        state = self.state("model")
        bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
        if bad is not None:
            raise CheckpointError(
                f"{self.path}: its weights hold NaN or infinite values (in {clip('model.' + bad, 80)}): the training diverged "
                "or the file was damaged; use an earlier checkpoint or retrain with a lower --lr"
            )
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{self.path}: the weights do not fit the {self.config.backbone} model: {clip(str(exc), 300)}"
            ) from exc
        model.preprocessing = self.preprocessing
        return model.to(device).eval()

    def build_das(self) -> DenselyAnchoredSampling | None:
        """The DAS module with its trained state, or ``None`` for a run trained without DAS."""
        if not self.has_das:
            return None
        from das_core.training.losses import build_das

        cfg = self.config if self.config.das else self.config.replace(das=True)
        das = build_das(cfg, len(self.class_names))
        assert das is not None
        state = self.state("criterion.das")
        try:
            das.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.path}: its DAS state does not fit: {clip(str(exc), 300)}") from exc
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
    try:
        if p.is_dir():
            found = RunLayout(p).checkpoint
            if found is not None:
                return found
            raise CheckpointError(f"{p} is a folder without a checkpoint: expected {' or '.join(CHECKPOINTS)} in it")
        if not p.exists():
            raise CheckpointError(f"{p} does not exist")
        if not p.is_file():  # a FIFO or a device would block or never end
            raise CheckpointError(f"{p} is not a regular file (a pipe, socket or device?)")
    except OSError as exc:  # e.g. a name too long for the file system
        raise CheckpointError(f"{_short_path(p)}: cannot open it: {exc.strerror or exc}") from exc
    return p


def _short_path(p: Path) -> str:
    text = str(p)
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text):,} characters)"


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking the file is whole and every
    header entry well formed (``CheckpointError`` otherwise)."""
    try:
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
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise CheckpointError(f"{path}: malformed safetensors header: its metadata must map names to strings")
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and isinstance(shape, list)
            and all(_is_count(d) for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise CheckpointError(
                f"{path}: malformed safetensors header entry {clip(key, 80)}: {clip(info)} "
                "(expected dtype, shape and data_offsets [begin, end] as whole numbers)"
            )
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated: its tensors need {8 + n + end} bytes but the file has {size} "
            "(an interrupted copy or download?)"
        )
    return header


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


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
    version = _int_meta(p, meta, "format_version", high=10**6)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: written by DAS Explorer {meta.get('code_version', '?')} in checkpoint format {version}; "
            f"this version ({code_version()}) reads formats up to {FORMAT_VERSION}. Upgrade DAS Explorer."
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(p), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{p}: cannot read its tensors: {clip(str(exc), 300)}") from exc
    meta, tensors = migrate(p, version, dict(meta), tensors)
    return _from_parts(p, meta, tensors)


MAX_EPOCH = 10**7
MAX_CLASSES = 10**7
MAX_CLASS_NAME = 1000


def _int_meta(p: Path, meta: Mapping[str, str], key: str, *, high: int, default: str | None = None) -> int:
    """A whole number in ``0..high`` stored as text in the metadata."""
    text = meta.get(key, default)
    if not isinstance(text, str) or not text.strip().isdigit() or len(text) > 20 or int(text) > high:
        raise CheckpointError(
            f"{p}: checkpoint metadata {key!r} must be a whole number from 0 to {high:,}, not {clip(text)}"
        )
    return int(text)


def _json_meta(p: Path, meta: Mapping[str, str], key: str, kind: type, default: str | None = None) -> Any:
    """A JSON value of type ``kind`` stored as text in the metadata."""
    text = meta.get(key, default)
    if text is None:
        raise CheckpointError(f"{p}: checkpoint metadata lacks {key!r}")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, a >4300-digit number
        raise CheckpointError(f"{p}: checkpoint metadata {key!r} is not valid JSON: {clip(text)}") from exc
    if not isinstance(value, kind):
        raise CheckpointError(
            f"{p}: checkpoint metadata {key!r} must be a JSON {'object' if kind is dict else 'list'}, not {clip(value)}"
        )
    return value


def _str_meta(p: Path, meta: Mapping[str, str], key: str, default: str, limit: int = 200) -> str:
    value = meta.get(key, default)
    if len(value) > limit:
        raise CheckpointError(f"{p}: checkpoint metadata {key!r} is {len(value):,} characters (at most {limit})")
    return value


def _is_number(v: object) -> bool:
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool))


def parse_metadata(p: Path, meta: Mapping[str, str]) -> dict[str, Any]:
    """The one validation of a checkpoint's metadata (types, ranges, sizes), shared by every
    reader: the typed values, or a ``CheckpointError`` naming the field, whose message never
    holds more than a cut piece of a bad value."""
    config_map = _json_meta(p, meta, "config", dict)
    try:
        config = TrainConfig.from_mapping(config_map)
    except ConfigError as exc:
        raise CheckpointError(f"{p}: the config in its metadata is invalid: {exc}") from exc
    class_names = _json_meta(p, meta, "class_names", list)
    if len(class_names) > MAX_CLASSES or not all(
        isinstance(c, str) and len(c) <= MAX_CLASS_NAME for c in class_names
    ):
        bad = next((c for c in class_names if not isinstance(c, str) or len(c) > MAX_CLASS_NAME), None)
        raise CheckpointError(
            f"{p}: checkpoint metadata 'class_names' must be a list of names (text up to {MAX_CLASS_NAME} "
            f"characters); it holds {clip(bad)}"
        )
    prep_map = _json_meta(p, meta, "preprocessing", dict)
    try:
        prep = Preprocessing.from_json(json.dumps(prep_map))
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
        raise CheckpointError(f"{p}: checkpoint metadata 'preprocessing' is invalid: {clip(str(exc), 200)}") from exc
    metrics = _json_meta(p, meta, "metrics", dict, default="{}")
    for name, value in metrics.items():
        ok = _is_number(value) or (isinstance(value, dict) and all(_is_number(v) for v in value.values()))
        if not ok:
            raise CheckpointError(
                f"{p}: checkpoint metadata 'metrics' entry {clip(name, 60)} must be a number or a mapping of "
                f"metric: number, not {clip(value)}"
            )
    return {
        "config": config,
        "class_names": class_names,
        "preprocessing": prep,
        "metrics": metrics,
        "dataset": _str_meta(p, meta, "dataset", config.dataset),
        "epoch": _int_meta(p, meta, "epoch", high=MAX_EPOCH, default="0"),
        "code_version": _str_meta(p, meta, "code_version", "?"),
        "format_version": _int_meta(p, meta, "format_version", high=10**6),
    }


def checkpoint_identity(path: str | Path) -> str:
    """The identity of the checkpoint at ``path`` (a file or a run folder): 16 hex characters
    of the SHA-256 of its bytes, so a retrained or replaced file gets a new one and a copy
    keeps it. Memoised per file, size and modification time: cheap to ask again."""
    p = resolve_checkpoint_path(path)
    try:
        return file_key(p)
    except OSError as exc:
        raise CheckpointError(f"{_short_path(p)}: cannot read it: {exc.strerror or exc}") from exc


def _from_parts(p: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> Checkpoint:
    parsed = parse_metadata(p, meta)
    if not any(k.startswith("model.") for k in tensors):
        raise CheckpointError(f"{p}: holds no model weights")
    return Checkpoint(path=p, tensors=tensors, meta=meta, identity=checkpoint_identity(p), **parsed)


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
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        # torch.load parses an untrusted zip and pickle stream: each of these means "corrupt".
        raise CheckpointError(
            f"{p}: not a readable PyTorch file (truncated or corrupt?): {clip(str(exc), 200)}"
        ) from exc
    if not isinstance(obj, dict) or obj.get("format") != "das-explorer":
        kind = type(obj).__name__
        keys = ", ".join(clip(k, 40) for k in list(obj)[:5]) if isinstance(obj, dict) else ""
        raise CheckpointError(
            f"{p}: a PyTorch file, but not a DAS Explorer checkpoint (a {kind}{' with keys ' + keys if keys else ''}). "
            "Train one with `python -m das_core train`."
        )
    meta, tensors = _legacy_to_v0_parts(p, obj)
    meta, tensors = migrate(p, 0, meta, tensors)
    return _from_parts(p, meta, tensors)


def _legacy_to_v0_parts(p: Path, obj: dict[str, Any]) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    # Only the layout is read here; the values are checked by parse_metadata like any file's.
    try:
        config = obj["config"]
        dataset = obj.get("dataset", config.get("dataset", "?") if isinstance(config, dict) else "?")
        meta = {
            "format": FORMAT,
            "format_version": "0",
            "code_version": str(obj.get("code_version", "0.0 (legacy .pt)"))[:200],
            "config": json.dumps(config),
            "class_names": json.dumps(obj["class_names"]),
            "dataset": dataset if isinstance(dataset, str) else "?",
            "preprocessing": json.dumps(obj["preprocessing"]),
            "metrics": json.dumps(obj.get("metrics", {})),
            "epoch": str(obj.get("epoch", 0))[:40],
        }
        model, das = obj["model"], obj.get("das") or {}
        if not isinstance(model, dict) or not isinstance(das, dict):
            raise TypeError("model and das must be mappings of name: tensor")
        tensors = {f"model.{k}": v for k, v in model.items()}
        for k, v in das.items():
            tensors[f"das.{k}"] = v
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{p}: legacy DAS Explorer file with missing or invalid fields ({clip(str(exc), 200)})") from exc
    if not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointError(f"{p}: legacy file holds non-tensor weights")
    return meta, tensors


def _migrate_0_to_1(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    # Format 0 kept DAS buffers at top level ("das.*"); format 1 keeps all criterion state
    # under "criterion.*" so proxies and PDDM weights travel too.
    moved = {(f"criterion.{k}" if k.startswith("das.") else k): v for k, v in tensors.items()}
    return meta, moved


MIGRATIONS[0] = _migrate_0_to_1
