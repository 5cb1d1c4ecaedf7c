"""The Train page's form: one field per TrainConfig option, values to a validated config, the
equivalent CLI command, and config errors as field messages.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from das_core.training.config import GROUPS, ConfigError, TrainConfig, field_base

if TYPE_CHECKING:

    pass


@dataclass(frozen=True)
class FieldSpec:
    """One ``TrainConfig`` field as a form widget."""

    name: str
    group: str
    kind: str  # choice | bool | int | float | str | ints (whole numbers as text, e.g. 200,250)
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
    out: list[FieldSpec] = []
    for f in dataclasses.fields(TrainConfig):
        rule = TrainConfig.rule(f.name)
        base, optional = field_base(f.name)
        kinds = {bool: "bool", int: "int", float: "float", tuple: "ints"}
        kind = "choice" if rule.choices is not None else kinds.get(base, "str")
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
        allowed = "whole numbers of epochs, strictly increasing, e.g. 200,250" if kind == "ints" else rule.describe()
        out.append(FieldSpec(
            name=f.name, group=rule.group, kind=kind, optional=optional, default=f.default, help=rule.help,
            choices=rule.choices, min_value=min_v, max_value=max_v, step=step, allowed=allowed,
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
    from das_core.training.presets import get_preset

    cfg = TrainConfig() if preset is None else get_preset(preset).config()
    values = cfg.to_dict()
    for spec in config_fields():
        if spec.kind == "ints":  # a text field: 200,250 (config_from_form reads it back)
            values[spec.name] = _int_text(getattr(cfg, spec.name))
    return values


def _int_text(values: Sequence[int]) -> str:
    return ",".join(str(v) for v in values)


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
        elif isinstance(value, tuple):
            parts.append(f"{flag} {shlex.quote(_int_text(value))}")
        else:
            parts.append(f"{flag} {shlex.quote(format(value, 'g') if isinstance(value, float) else str(value))}")
    return " ".join(parts)


def describe_config_error(exc: ConfigError) -> dict[str, str]:
    """The parts of a ``ConfigError`` to show next to the form."""
    from das_core.messages import clip

    return {"field": exc.field, "value": clip(exc.value), "allowed": exc.allowed}
