"""The range of each DAS hyper-parameter, declared once.

One row per hyper-parameter of Densely-Anchored Sampling (``T, K, Z, r_s, r_b, γ``): the values
it accepts (``low`` / ``high``, each bound open or closed) and the part of that range the app's
sliders offer (``ui_low`` / ``ui_high`` / ``ui_step``; a checkpoint's own value outside it
widens the slider, never past the valid range). Every place that takes one of these values
reads this table, so a value is accepted or refused with the same words everywhere:

* the training config (``TrainConfig``; so the CLI flags, their ``--help``, the YAML file and
  the app's Train form),
* the ``DenselyAnchoredSampling`` constructor and the overrides of ``produce``,
* the sliders of the Explore and DAS internals pages.

Torch-free, so the app may import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType


def describe_bounds(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    """``"> 0 and < 1"``, ``">= 0 and <= 100"``, ``">= 1"``: a range in words (config and module)."""
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts) if parts else "any value of its type"


@dataclass(frozen=True)
class ParamRange:
    """What one DAS hyper-parameter accepts, and what its slider offers."""

    symbol: str  # the paper's name: T, K, Z, r_s, r_b, gamma
    kwarg: str  # the DenselyAnchoredSampling keyword (gamma: each end of gamma_range)
    fields: tuple[str, ...]  # the TrainConfig field(s) holding it
    integer: bool
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    # The slider's range and step (None: the app offers no slider for it).
    ui_low: float | None = None
    ui_high: float | None = None
    ui_step: float | None = None

    def describe(self) -> str:
        return describe_bounds(self.low, self.high, self.low_open, self.high_open)

    def contains(self, value: float) -> bool:
        """Inside the valid range (NaN never is)."""
        lo_ok = value > self.low if self.low_open else value >= self.low
        hi_ok = value < self.high if self.high_open else value <= self.high
        return bool(lo_ok and hi_ok)

    def check(self, value: object, name: str | None = None) -> float:
        """``value`` as a float when it is a number (an integer for ``T``, ``K``, ``Z``) inside
        the range; ``ValueError`` ``"<name>=<value> is out of range: must be <rule>"`` (the
        words the config uses too) otherwise."""
        name = name or self.kwarg
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int if self.integer else int | float):
            raise ValueError(f"{name}={value!r} is not allowed: must be {kind} {self.describe()}")
        if not self.contains(value):
            raise ValueError(f"{name}={value!r} is out of range: must be {self.describe()}")
        return float(value)

    def check_int(self, value: object, name: str | None = None) -> int:
        """:meth:`check` for the integer parameters (``T``, ``K``, ``Z``), returning an int."""
        assert self.integer, f"{self.symbol} is not an integer parameter"
        return int(self.check(value, name))

    def bounds(self) -> dict[str, float | bool]:
        """The bounds as ``Rule`` keyword arguments (``low``, ``high``, ``low_open``, ``high_open``)."""
        return {"low": self.low, "high": self.high, "low_open": self.low_open, "high_open": self.high_open}

    def slider(self, value: float) -> tuple[float, float, float]:
        """``(min, max, value)`` of this parameter's slider showing ``value``: the UI range,
        widened to take ``value`` when it lies outside it (within the valid range), and
        ``value`` clamped into it. Closed bounds only: an open valid bound is never offered."""
        if self.ui_low is None or self.ui_high is None:
            raise ValueError(f"{self.symbol} has no slider")
        lo, hi = self.ui_low, self.ui_high
        if math.isfinite(value) and self.contains(value):
            lo, hi = min(lo, value), max(hi, value)
        return lo, hi, min(max(value, lo), hi)


# T: the config allowed 64 and the module any number; 1024 keeps both uses (the tests draw 400
# rounds in one call to check the draws) at a size one batch still holds.
T = ParamRange("T", "num_produce", ("das_num_produce",), True, 1, 1024, ui_low=1, ui_high=10, ui_step=1)
# K is also bounded by the embedding dimension (checked where the dimension is known).
K = ParamRange("K", "topk", ("das_topk",), True, 1, 8192, ui_low=1, ui_high=8192, ui_step=1)
Z = ParamRange("Z", "bank_size", ("das_bank_size",), True, 1, 100_000)
R_S = ParamRange(
    "r_s", "r_s", ("das_r_s",), False, 0.0, 1.0, low_open=True, high_open=True,
    ui_low=0.001, ui_high=0.99, ui_step=0.001,
)
R_B = ParamRange("r_b", "r_b", ("das_r_b",), False, 0.0, 100.0, ui_low=0.0, ui_high=2.0, ui_step=0.005)
GAMMA = ParamRange("gamma", "gamma_range", ("das_gamma_low", "das_gamma_high"), False, 0.0, 100.0, low_open=True)

DAS_RANGES = MappingProxyType({r.symbol: r for r in (T, K, Z, R_S, R_B, GAMMA)})
"""symbol → range: the one table of DAS hyper-parameter ranges."""
BY_FIELD = MappingProxyType({f: r for r in DAS_RANGES.values() for f in r.fields})
"""TrainConfig field → its range."""

__all__ = ["BY_FIELD", "DAS_RANGES", "GAMMA", "K", "R_B", "R_S", "T", "Z", "ParamRange", "describe_bounds"]
