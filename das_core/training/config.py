"""The training configuration: one typed, frozen object validated at the edge.

Every option is declared once, here, with its type, default, allowed values and
help text. The CLI flags (``das_core.cli``), the YAML config file and the app's
Train form are all generated from (or checked against) these declarations, so a
bad value gets the same message wherever it comes from, before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from das_core.training.ranges import GAMMA, R_B, R_S, K, T, Z, describe_bounds

if typing.TYPE_CHECKING:
    from das_core.data.spec import SplitSpec

# Names of the registered components. The registries (das_core.data, .models,
# .losses, .miners) are keyed by exactly these names; a test checks they agree.
DATASETS = ("fashion-mnist", "digits", "cub200", "cars196", "sop", "folder", "emoji-styles")
BACKBONES = ("small-cnn", "resnet50", "efficientnet-lite0", "bn-inception")
LOSSES = (
    "triplet",
    "contrastive",
    "margin",
    "multi-similarity",
    "npair",
    "lifted",
    "normalized-softmax",
    "arcface",
    "proxy-anchor",
    "pddm",
)
MINERS = (
    "none",
    "random",
    "semi-hard",
    "soft-hard",
    "distance-weighted",
    "multi-similarity",
    "pddm",
)
SELECT_METRICS = ("R@1", "MAP@R", "RP", "NMI", "F1")


class ConfigError(ValueError):
    """A configuration value is impossible. Names the field, the value and what is allowed."""

    def __init__(self, name: str, value: object, allowed: str) -> None:
        self.field = name
        self.value = value
        self.allowed = allowed
        from das_core.messages import clip

        shown = name if len(name) <= 60 else f"{name[:60]}... ({len(name):,} characters)"
        super().__init__(f"invalid config value {shown}={clip(value)}: {allowed}")


@dataclass(frozen=True)
class Rule:
    """What a field accepts, beyond its type."""

    help: str
    group: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    # Shown in --help and in the app's form; CLI flag name derives from the field name.
    metavar: str | None = None

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        return describe_bounds(self.low, self.high, self.low_open, self.high_open)


def _opt(default: Any, help: str, group: str, **rule: Any) -> Any:
    return field(default=default, metadata={"rule": Rule(help=help, group=group, **rule)})


GROUPS = ("data", "model", "loss", "pddm", "das", "optim", "run")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs. Build it with ``TrainConfig.from_mapping`` to validate."""

    # -- data ---------------------------------------------------------------------------------
    dataset: str = _opt("fashion-mnist", "dataset to train and evaluate on", "data", choices=DATASETS)
    data_root: str | None = _opt(
        None, "folder holding the dataset (default: the standard places for that dataset)", "data"
    )
    train_classes: int | None = _opt(
        None,
        "image folder only: how many classes (sorted by name) are training classes; the rest are "
        "test classes (default: the first half)",
        "data",
        low=1,
    )
    val_classes: int = _opt(
        0,
        "hold out this many *training* classes as a class-disjoint validation split (0 = none)",
        "data",
        low=0,
    )
    val_fraction: float = _opt(
        0.0,
        "hold out this fraction of each training class's images as validation (0 = none)",
        "data",
        low=0.0,
        high=0.5,
        high_open=False,
    )
    image_size: int | None = _opt(
        None, "input size in pixels (default: the backbone's own)", "data", low=8, high=1024
    )
    num_workers: int = _opt(
        -1, "DataLoader worker processes (-1 = auto: 0 on CPU, up to 8 on CUDA)", "data", low=-1, high=64
    )
    # -- model --------------------------------------------------------------------------------
    backbone: str = _opt("small-cnn", "feature extractor", "model", choices=BACKBONES)
    embedding_dim: int = _opt(128, "size of the L2-normalised embedding", "model", low=2, high=8192)
    pretrained: bool = _opt(True, "start from ImageNet weights (ResNet-50, EfficientNet-Lite0)", "model")
    freeze_bn: bool = _opt(True, "freeze BatchNorm: running statistics fixed, layers in eval mode (ResNet-50, BN-Inception)", "model")
    freeze_bn_affine: bool = _opt(
        True,
        "with freeze_bn: also freeze BatchNorm's affine weights (off: they train, as in the authors' code)",
        "model",
    )
    normalize_embeddings: bool = _opt(
        True,
        "L2-normalise the embeddings the loss sees (off: raw embeddings for lifted / N-pair, as the authors; "
        "evaluation and the app always normalise)",
        "model",
    )
    pooling: str = _opt("avg", "global pooling of the backbone's feature map", "model", choices=("avg", "avg+max"))
    channels_last: bool = _opt(True, "use channels_last memory format on CUDA", "model")
    # -- loss and miner -----------------------------------------------------------------------
    loss: str = _opt("triplet", "metric-learning loss", "loss", choices=LOSSES)
    miner: str = _opt("semi-hard", "tuple miner run on the (DAS-enlarged) batch", "loss", choices=MINERS)
    margin: float | None = _opt(
        None,
        "loss margin (default per loss: triplet 0.2, contrastive 1.0, margin 0.2, lifted 1.0, proxy-anchor 0.1, arcface 28.6 degrees)",
        "loss",
        low=0.0,
        low_open=True,
        high=100.0,
    )
    triplet_form: str = _opt(
        "plain",
        "triplet loss form: plain (distances, mean over non-zero triplets; PML's default) or squared "
        "(squared distances, mean over all mined triplets; the authors' loss/triplet.py)",
        "loss",
        choices=("plain", "squared"),
    )
    embedding_l2: float = _opt(
        0.0,
        "weight of an L2 penalty, mean embedding norm of the (DAS-enlarged) batch (the authors: 0.005 for "
        "lifted and N-pair, with --no-normalize-embeddings)",
        "loss",
        low=0.0,
        high=10.0,
    )
    margin_beta: float = _opt(1.2, "margin loss: initial (learnable) boundary beta", "loss", low=0.0, high=10.0)
    ms_alpha: float = _opt(2.0, "multi-similarity: positive scale alpha", "loss", low=0.0, low_open=True)
    ms_beta: float = _opt(50.0, "multi-similarity: negative scale beta", "loss", low=0.0, low_open=True)
    ms_base: float = _opt(0.5, "multi-similarity: similarity offset lambda", "loss", low=-1.0, high=1.0)
    ms_epsilon: float = _opt(0.1, "multi-similarity miner: pair margin epsilon", "loss", low=0.0, high=2.0)
    dw_cutoff: float = _opt(
        0.5, "distance-weighted miner: distances below this are clipped", "loss", low=0.0, high=2.0
    )
    loss_lr: float | None = _opt(
        None,
        "learning rate of the loss's own parameters (proxies, margin beta; default: 100 x lr)",
        "loss",
        low=0.0,
        low_open=True,
        high=100.0,
    )
    # -- PDDM ---------------------------------------------------------------------------------
    pddm_alpha: float = _opt(0.5, "PDDM metric-loss margin alpha", "pddm", low=0.0)
    pddm_beta: float = _opt(1.0, "PDDM embedding-loss margin beta", "pddm", low=0.0)
    pddm_lambda: float = _opt(0.5, "PDDM weight lambda of the embedding loss", "pddm", low=0.0)
    pddm_quadruplets: int = _opt(
        1, "PDDM: hard quadruplets mined per batch (the paper mines 1)", "pddm", low=1, high=4096
    )
    pddm_lr: float | None = _opt(
        None, "learning rate of the PDDM unit (default: 10 x lr)", "pddm", low=0.0, low_open=True
    )
    # -- DAS ----------------------------------------------------------------------------------
    das: bool = _opt(False, "Densely-Anchored Sampling between the embedding network and the loss", "das")
    # The DAS hyper-parameters' ranges come from das_core.training.ranges (one table for the
    # config, the CLI, the DAS module and the app's sliders).
    das_num_produce: int = _opt(3, "T: rounds of produced embeddings per real one", "das", **T.bounds())
    das_topk: int = _opt(
        4, "K: frequently activated dimensions kept per class (DFS mask)", "das", **K.bounds()
    )
    das_bank_size: int = _opt(10, "Z: transformations memorised per class (MTS bank)", "das", **Z.bounds())
    das_r_s: float = _opt(
        0.01,
        "r_s: scale range, gamma ~ U[1-r_s, 1+r_s] (the symmetric shorthand of das_gamma_low/high)",
        "das",
        **R_S.bounds(),
    )
    das_gamma_low: float | None = _opt(
        None,
        "asymmetric scale range: gamma ~ U[low, high) (set both; default: 1 - r_s)",
        "das",
        **GAMMA.bounds(),
    )
    das_gamma_high: float | None = _opt(
        None, "asymmetric scale range: upper end (default: 1 + r_s)", "das", **GAMMA.bounds()
    )
    das_r_b: float = _opt(0.01, "r_b: weight of the memorised shift", "das", **R_B.bounds())
    das_normalize: bool = _opt(True, "L2-normalise produced embeddings", "das")
    das_detach: bool = _opt(True, "produce from a detached copy of the real embeddings", "das")
    das_mode: str = _opt(
        "both",
        "which half of DAS produces: both, dfs (scaling only) or mts (shifting only)",
        "das",
        choices=("both", "dfs", "mts"),
    )
    das_bank_overflow: str = _opt(
        "fifo",
        "a class bringing more than Z pairs to one batch: fifo (push all in order; the last Z remain) or "
        "authors (bank overwritten by the last Z, pointer kept; their embedding_producer.py)",
        "das",
        choices=("fifo", "authors"),
    )
    das_aux_weight: float = _opt(
        0.0,
        "0: the loss sees real + produced (the paper); w > 0: L(real) + w * L(real + produced)",
        "das",
        low=0.0,
        high=100.0,
    )
    das_grad_norm: bool = _opt(
        False,
        "rescale the DAS loss every step so the gradient reaching the real embeddings has the norm "
        "the plain loss on the real batch would give it",
        "das",
    )
    das_exclude_own_copies: bool = _opt(
        False, "drop mined pairs and triplets that pair an embedding with its own produced copies", "das"
    )
    das_diagnostics_steps: int = _opt(
        4,
        "DAS diagnostics (tuple shares, real vs produced gradients, bank age) measured on this many "
        "steps per epoch, written to metrics.jsonl (0 = off)",
        "das",
        low=0,
        high=10000,
    )
    # -- optimisation -------------------------------------------------------------------------
    optimizer: str = _opt(
        "adam",
        "optimiser: adam (weight decay added to the gradient, as the paper), adamw (decoupled weight "
        "decay) or sgd (momentum 0.9, Nesterov)",
        "optim",
        choices=("adam", "adamw", "sgd"),
    )
    lr: float = _opt(1e-3, "learning rate of the network", "optim", low=0.0, low_open=True, high=10.0)
    weight_decay: float = _opt(4e-4, "weight decay", "optim", low=0.0, high=1.0)
    batch_size: int = _opt(100, "real images per batch (classes x samples per class)", "optim", low=2, high=65536)
    samples_per_class: int = _opt(20, "images of each class in a batch", "optim", low=1, high=65536)
    class_sampling: str = _opt(
        "distinct",
        "batch sampler: distinct (batch_size / samples_per_class different classes) or replacement (classes "
        "and images drawn with replacement, as the authors: a class can come twice)",
        "optim",
        choices=("distinct", "replacement"),
    )
    epochs: int = _opt(5, "training epochs", "optim", low=1, high=100000)
    steps_per_epoch: int | None = _opt(
        None, "batches per epoch (default: training images / batch size)", "optim", low=1
    )
    lr_schedule: str = _opt(
        "constant",
        "learning-rate schedule, set per epoch: constant, multistep (x lr_factor at each milestone) or cosine",
        "optim",
        choices=("constant", "multistep", "cosine"),
    )
    lr_milestones: tuple[int, ...] = _opt(
        (),
        "multistep: epoch counts after which the lr is multiplied by lr_factor, strictly increasing "
        "(flag and text: 200,250; YAML: [200, 250]; empty = none)",
        "optim",
        metavar="E1,E2",
    )
    lr_factor: float = _opt(0.3, "multistep: the lr multiplier at each milestone", "optim", low=0.0, low_open=True, high=1.0)
    amp: bool = _opt(True, "automatic mixed precision (CUDA only; ignored on CPU)", "optim")
    # -- run ----------------------------------------------------------------------------------
    seed: int = _opt(0, "random seed (same seed, same metrics on CPU)", "run", low=0, high=2**31 - 1)
    device: str = _opt("auto", "where to train", "run", choices=("auto", "cpu", "cuda"))
    out: str | None = _opt(None, "run folder (default: runs/<dataset>-<loss>-<time>)", "run")
    eval_batch_size: int = _opt(256, "images per batch when embedding for evaluation", "run", low=1, high=65536)
    eval_every: int = _opt(1, "evaluate every N epochs (the last epoch always)", "run", low=1)
    select_metric: str = _opt(
        "R@1", "validation metric that selects best.safetensors", "run", choices=SELECT_METRICS
    )
    tensorboard: bool = _opt(
        False,
        "write the per-epoch scalars (loss, lr, validation and test metrics, DAS statistics) as TensorBoard "
        "event files in <run>/tensorboard",
        "run",
    )
    timeline_probe: int = _opt(
        2000,
        "training timeline: embeddings of this many test images (a fixed subset, the same for every run of "
        "the dataset) stored before training and after every epoch (at most 50 epochs, evenly spaced) in "
        "<run>/timeline.npz (0 = off)",
        "run",
        low=0,
        high=100000,
    )

    # ---------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def rule(cls, name: str) -> Rule:
        for f in dataclasses.fields(cls):
            if f.name == name:
                rule = f.metadata["rule"]
                assert isinstance(rule, Rule)
                return rule
        raise KeyError(name)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, base: TrainConfig | None = None) -> TrainConfig:
        """Build a validated config from a (flat or grouped) mapping; unknown keys are refused."""
        if not isinstance(values, Mapping):
            raise ConfigError("config", values, "must be a mapping of option: value")
        flat = flatten_groups(values)
        known = set(cls.field_names())
        unknown = sorted(k for k in flat if k not in known)
        if unknown:
            raise ConfigError(
                unknown[0],
                flat[unknown[0]],
                "unknown option; valid options are: " + ", ".join(sorted(known)),
            )
        hints = typing.get_type_hints(cls)
        coerced = {name: _coerce(name, value, hints[name]) for name, value in flat.items()}
        start = base if base is not None else cls()
        cfg = dataclasses.replace(start, **coerced)
        cfg.validate()
        return cfg

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with some values changed."""
        return TrainConfig.from_mapping(changes, base=self)

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON / YAML data (``lr_milestones`` as a list); ``from_mapping``
        reads it back."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def grouped(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
        for f in dataclasses.fields(self):
            out[f.metadata["rule"].group][f.name] = _plain(getattr(self, f.name))
        return out

    def validate(self) -> None:
        """Check every field against its rule, then the cross-field constraints."""
        for f in dataclasses.fields(self):
            _check_rule(f.name, getattr(self, f.name), f.metadata["rule"])
        if self.batch_size % self.samples_per_class != 0:
            raise ConfigError(
                "batch_size",
                self.batch_size,
                f"must be a multiple of samples_per_class={self.samples_per_class} "
                f"(a batch is classes x samples per class); e.g. "
                f"{max(1, self.batch_size // self.samples_per_class) * self.samples_per_class}",
            )
        if self.batch_size // self.samples_per_class < 2:
            raise ConfigError(
                "batch_size",
                self.batch_size,
                f"a batch needs at least 2 classes (batch_size >= 2 x samples_per_class="
                f"{2 * self.samples_per_class}), or no pair has a negative",
            )
        if self.das_topk > self.embedding_dim:
            raise ConfigError(
                "das_topk", self.das_topk, f"must be <= embedding_dim={self.embedding_dim}"
            )
        _check_milestones(self.lr_milestones)
        if self.lr_schedule == "multistep" and not self.lr_milestones:
            raise ConfigError("lr_milestones", self.lr_milestones, "multistep needs milestones, e.g. 200,250")
        if (self.das_gamma_low is None) != (self.das_gamma_high is None):
            raise ConfigError(
                "das_gamma_low" if self.das_gamma_low is None else "das_gamma_high",
                None,
                "give both ends of the asymmetric scale range (das_gamma_low and das_gamma_high), or neither",
            )
        if self.das_gamma_low is not None and self.das_gamma_high is not None and not (
            self.das_gamma_low < self.das_gamma_high
        ):
            raise ConfigError(
                "das_gamma_high", self.das_gamma_high, f"must be > das_gamma_low={self.das_gamma_low}"
            )
        if self.val_classes and self.val_fraction:
            raise ConfigError(
                "val_fraction",
                self.val_fraction,
                "choose one validation split: val_classes (class-disjoint) or val_fraction, not both",
            )
        if self.miner == "pddm" and self.loss in PROXY_LOSSES:
            raise ConfigError("miner", self.miner, f"PDDM mining needs a pair or triplet loss, not {self.loss}")
        if self.miner not in ("none",) and self.loss in MINERLESS_LOSSES:
            raise ConfigError(
                "miner",
                self.miner,
                f"loss {self.loss} uses every pair (or its proxies) and takes no miner; use --miner none",
            )
        if self.das_exclude_own_copies and (self.loss in MINERLESS_LOSSES or self.miner == "pddm"):
            raise ConfigError(
                "das_exclude_own_copies",
                True,
                f"needs a pair or triplet loss with a tuple miner (or --miner none); {self.loss} with "
                f"miner {self.miner} forms no tuples to filter",
            )
        for name in ("out", "data_root"):
            check_path(name, getattr(self, name))
        if self.backbone == "small-cnn" and self.image_size is not None and self.image_size < 16:
            raise ConfigError("image_size", self.image_size, "the small CNN needs at least 16 pixels")

    def gamma_range(self) -> tuple[float, float]:
        """The DFS scale range ``[low, high)``: the asymmetric ends when set, else ``1 ∓ r_s``."""
        if self.das_gamma_low is not None and self.das_gamma_high is not None:
            return (self.das_gamma_low, self.das_gamma_high)
        return (1.0 - self.das_r_s, 1.0 + self.das_r_s)

    def das_halves(self) -> tuple[bool, bool]:
        """``(use_dfs, use_mts)`` of ``das_mode``: the one place the mode becomes the two switches."""
        return self.das_mode in ("both", "dfs"), self.das_mode in ("both", "mts")

    def split_spec(self, data_root: str | None = None) -> SplitSpec:
        """Which dataset splits this config trains and evaluates on (``data_root`` overrides
        the config's folder): the one config → splits mapping, used by the trainer, the CLI,
        the embedding cache and the app. ``.load()`` loads them."""
        from das_core.data.spec import SplitSpec

        return SplitSpec(
            dataset=self.dataset,
            data_root=data_root if data_root is not None else self.data_root,
            train_classes=self.train_classes,
            val_classes=self.val_classes,
            val_fraction=self.val_fraction,
            seed=self.seed,
            image_size=self.image_size,
        )

    def das_kwargs(self) -> dict[str, Any]:
        """The ``DenselyAnchoredSampling`` keyword arguments of this config (besides the number of
        classes and the dimension), whether or not it trains with DAS: the one config → DAS
        mapping, used by the trainer, the checkpoint loader, the app's what-if state and the
        benchmarks."""
        return {
            "num_produce": int(self.das_num_produce),
            "topk": int(self.das_topk),
            "r_s": float(self.das_r_s),
            "r_b": float(self.das_r_b),
            "bank_size": int(self.das_bank_size),
            "normalize": bool(self.das_normalize),
            "detach": bool(self.das_detach),
            "use_dfs": self.das_halves()[0],
            "use_mts": self.das_halves()[1],
            "gamma_range": self.gamma_range() if self.das_gamma_low is not None else None,
            "bank_overflow": "authors" if self.das_bank_overflow == "authors" else "fifo",
        }

    @property
    def samples_needed_classes(self) -> int:
        """How many distinct training classes one batch draws."""
        return self.batch_size // self.samples_per_class


PROXY_LOSSES = ("normalized-softmax", "arcface", "proxy-anchor")
# Losses that take no tuple miner: proxy losses, and PDDM (it mines its own quadruplets).
MINERLESS_LOSSES = (*PROXY_LOSSES, "npair", "pddm")


def flatten_groups(values: Mapping[str, Any]) -> dict[str, Any]:
    """Accept ``{"das": {"r_s": 0.1}}`` as well as ``{"das_r_s": 0.1}``; a group of the same
    name as a field (``das``, ``loss``) is a group only when its value is a mapping."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(str(key), value, "option names must be strings")
        name = key.replace("-", "_")
        if isinstance(value, Mapping):
            if name not in GROUPS:
                raise ConfigError(name, dict(value), f"only the groups {', '.join(GROUPS)} may hold a mapping")
            for sub, subvalue in value.items():
                sub_name = str(sub).replace("-", "_")
                if name == "das" and sub_name in ("enabled", "das"):
                    flat["das"] = subvalue
                    continue
                full = sub_name if sub_name in _FIELD_NAMES else f"{name}_{sub_name}"
                flat[full] = subvalue
        else:
            flat[name] = value
    return flat


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type; ints are accepted for floats, nothing else converts."""
    optional = False
    target = hint
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        optional = len(args) < len(get_args(hint))
        target = args[0]
    if get_origin(target) is tuple:
        return _int_tuple(name, value)
    if value is None:
        if optional:
            return None
        raise ConfigError(name, value, f"a value is required ({_type_name(target)})")
    if target is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(name, value, "must be true or false")
    if target is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(name, value, "must be a whole number")
        return value
    if target is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(name, value, "must be a number")
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(name, value, "is too large to be a number here") from None
        if not math.isfinite(value):
            raise ConfigError(name, value, "must be a finite number")
        return value
    if target is str:
        if isinstance(value, Path):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(name, value, "must be a string")
        return value
    return value  # pragma: no cover - every field is one of the types above


def _plain(value: Any) -> Any:
    """A field value as JSON / YAML data: tuples become lists (``yaml.safe_dump`` refuses tuples)."""
    return list(value) if isinstance(value, tuple) else value


def _is_whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    """An epoch list in any of the forms users and stored configs use: ``"200,250"`` (the CLI,
    old run folders and checkpoints; ``""`` = none), ``[200, 250]`` (YAML, JSON) or ``200``."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return ()
        try:
            return tuple(int(part) for part in text.split(","))
        except ValueError:
            raise ConfigError(name, value, "comma-separated whole numbers of epochs, e.g. 200,250") from None
    if _is_whole(value):
        return (value,)
    if isinstance(value, list | tuple) and all(_is_whole(v) for v in value):
        return tuple(value)
    raise ConfigError(name, value, "whole numbers of epochs: a list [200, 250], the text 200,250, or one number")


def _check_milestones(values: Any) -> None:
    if not isinstance(values, tuple) or not all(_is_whole(v) for v in values):
        raise ConfigError(
            "lr_milestones", values, "a tuple of whole numbers of epochs, e.g. (200, 250); from_mapping also reads 200,250"
        )
    if any(v < 1 for v in values) or any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ConfigError("lr_milestones", values, "epoch counts >= 1, strictly increasing")


def field_base(name: str) -> tuple[type, bool]:
    """The value type of a ``TrainConfig`` field (``bool``, ``int``, ``float``, ``str``, or
    ``tuple`` for a list of whole numbers) and whether ``None`` is allowed: what the CLI flags,
    the app's form and the sweep parser build on."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if get_origin(hint) is tuple:
        return tuple, False
    args = get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    return base, optional


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", str(t))


def _check_rule(name: str, value: Any, rule: Rule) -> None:
    if value is None:
        return
    if rule.choices is not None and value not in rule.choices:
        raise ConfigError(name, value, "must be " + rule.describe())
    if isinstance(value, int | float) and not isinstance(value, bool):
        too_low = rule.low is not None and (value <= rule.low if rule.low_open else value < rule.low)
        too_high = rule.high is not None and (value >= rule.high if rule.high_open else value > rule.high)
        if too_low or too_high:
            raise ConfigError(name, value, "must be " + rule.describe())


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(TrainConfig))
_NAME_MAX = 255  # bytes per path component on Linux/macOS file systems


def check_path(name: str, value: str | None) -> None:
    """A path option the file system can hold: no NUL byte, no component over 255 bytes."""
    if value is None:
        return
    if "\0" in value:
        raise ConfigError(name, value, "a path cannot hold a NUL character")
    for part in Path(value).parts:
        if len(part.encode("utf-8", "surrogateescape")) > _NAME_MAX:
            raise ConfigError(
                name, value, f"one folder name in it is {len(part):,} characters long; file systems allow {_NAME_MAX} bytes"
            )


# YAML config files: PyYAML's safe loader runs no code, but it shares aliased nodes, so a few
# hundred bytes of nested aliases (a "billion laughs") expand to millions of values once
# anything walks them, and it turns any digit string into an int (5,000 digits: a ValueError
# from Python's int limit). Config files are small and flat: cap both.
MAX_CONFIG_NODES = 10_000
MAX_CONFIG_BYTES = 1_000_000
MAX_NUMBER_DIGITS = 50


def _yaml_loader() -> type:
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
            digits = sum(ch.isdigit() for ch in str(node.value))
            if digits > MAX_NUMBER_DIGITS:
                raise _limit(
                    yaml.constructor.ConstructorError(
                        None, None, f"a number of {digits:,} digits (at most {MAX_NUMBER_DIGITS})", node.start_mark
                    )
                )
            return int(super().construct_yaml_int(node))

        def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
            if len(str(node.value)) > 4 * MAX_NUMBER_DIGITS:
                raise _limit(
                    yaml.constructor.ConstructorError(
                        None, None, f"a number of {len(str(node.value)):,} characters", node.start_mark
                    )
                )
            return float(super().construct_yaml_float(node))

        def construct_document(self, node: yaml.Node) -> Any:
            _check_expanded_size(node)
            return super().construct_document(node)

    ConfigLoader.add_constructor("tag:yaml.org,2002:int", ConfigLoader.construct_yaml_int)
    ConfigLoader.add_constructor("tag:yaml.org,2002:float", ConfigLoader.construct_yaml_float)
    return ConfigLoader


def _limit(exc: Exception) -> Exception:
    exc.das_limit = True  # type: ignore[attr-defined]
    return exc


def _check_expanded_size(root: Any) -> None:
    """Refuse a document whose values, with every alias expanded, exceed ``MAX_CONFIG_NODES``
    (counted once per node with memoisation, so the check itself stays cheap)."""
    import yaml

    sizes: dict[int, int] = {}

    def size(node: Any, depth: int) -> int:
        if depth > 100:
            raise _limit(yaml.YAMLError("values nested more than 100 levels deep"))
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = MAX_CONFIG_NODES + 1  # a cycle (a self-referencing alias) is too big
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        sizes[id(node)] = total
        if total > MAX_CONFIG_NODES:
            raise _limit(
                yaml.YAMLError(
                    f"with its aliases (*name) expanded it holds over {MAX_CONFIG_NODES:,} values; a config "
                    "file is a short list of option: value"
                )
            )
        return total

    size(root, 0)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a flat mapping (validated later, with the CLI overrides)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError("config", str(p), "the config file does not exist")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError("config", str(p), f"{p.stat().st_size:,} bytes is not a config file (at most {MAX_CONFIG_BYTES:,})")
    try:
        doc = yaml.load(p.read_text(encoding="utf-8"), Loader=_yaml_loader())  # a SafeLoader subclass
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise ConfigError("config", str(p), _yaml_problem(exc)) from exc
    except OSError as exc:
        raise ConfigError("config", str(p), f"cannot read it: {exc.strerror or exc}") from exc
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise ConfigError("config", str(p), "the file must hold a mapping of option: value")
    return flatten_groups(doc)


def _yaml_problem(exc: BaseException) -> str:
    """One bounded line for a YAML (or decoding) error: the problem and where it is."""
    import yaml

    if isinstance(exc, RecursionError):
        return "refused: values nested too deep"
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        text = f"{exc.problem}{where}"
    else:
        text = str(exc)
    text = " ".join(text.split())
    text = ("refused: " if getattr(exc, "das_limit", False) else "not valid YAML: ") + text
    return text if len(text) <= 300 else f"{text[:300]}... ({len(text):,} characters)"


def dump_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as grouped YAML (readable, and loadable by ``load_config_file``)."""
    import yaml

    from das_core.store.io import atomic_write_text

    text = "# Resolved DAS Explorer training config (flags and --config merged).\n"
    text += yaml.safe_dump(cfg.grouped(), sort_keys=False)
    atomic_write_text(Path(path), text)


DeviceName = Literal["auto", "cpu", "cuda"]
