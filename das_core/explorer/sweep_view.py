"""What the Sweeps page and the Train page's sweep launcher show: the trials of a sweep as
points over two searched options, and a sweep as its command line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from das_core.store.sweeps import SweepView
from das_core.training.sweep import SweepConfig


@dataclass(frozen=True)
class TrialPoints:
    """What the sweep plot draws over two searched options (``y`` None: one option, the
    metric on the y axis): finished trials with their value, the others, the best."""

    x: str
    y: str | None
    done: list[tuple[int, Any, Any, float]]  # (trial, x, y, value); y None with one option
    others: list[tuple[int, Any, Any, str]]  # (trial, x, y, state): running, failed, ...
    best: tuple[int, Any, Any, float] | None
    log_x: bool = False
    log_y: bool = False

    @property
    def gridded(self) -> bool:
        """Enough finished trials, spread over both axes, to draw a contour under them."""
        if self.y is None or len(self.done) < 3:
            return False
        return len({d[1] for d in self.done}) >= 2 and len({d[2] for d in self.done}) >= 2


def trial_points(view: SweepView, x: str, y: str | None) -> TrialPoints:
    """The trials of ``view`` over options ``x`` and ``y`` (labels, e.g. ``r_s``, ``r_b``)."""
    labels = view.labels
    for axis in (x, y):
        if axis is not None and axis not in labels:
            raise KeyError(f"{axis} is not searched by this sweep ({', '.join(labels)})")
    done, others = [], []
    for t in view.trials:
        if x not in t.params or (y is not None and y not in t.params):
            others.append((t.number, t.params.get(x), t.params.get(y) if y else None, t.state))
            continue
        yv = t.params[y] if y is not None else None
        if t.state == "complete" and t.value is not None:
            done.append((t.number, t.params[x], yv, float(t.value)))
        else:
            others.append((t.number, t.params[x], yv, t.state))
    best = view.best
    best_point = None
    if best is not None:
        best_point = next((d for d in done if d[0] == best.number), None)
    logs = {p.label: p.log for p in view.config.params}
    return TrialPoints(x, y, done, others, best_point, logs.get(x, False), bool(y and logs.get(y, False)))


def cli_command(sweep: SweepConfig, out: str | None = None) -> str:
    """The ``python -m das_core sweep`` command line of ``sweep`` (the base config's flags that
    differ from the defaults, then the search)."""
    import shlex

    from das_core.explorer.train_form import cli_command as train_command

    parts = [train_command(sweep.base).replace("python -m das_core train", "python -m das_core sweep", 1)]
    parts += [f"--param {shlex.quote(p.spec())}" for p in sweep.params]
    parts.append(f"--sampler {sweep.sampler}")
    if sweep.n_trials is not None:
        parts.append(f"--trials {sweep.n_trials}")
    parts.append(f"--metric {shlex.quote(sweep.metric)}")
    if sweep.direction != "maximize":
        parts.append(f"--direction {sweep.direction}")
    if out is not None:
        parts.append(f"--out {shlex.quote(out)}")
    return " ".join(parts)
