"""Hyper-parameter sweeps with Optuna: r_s, r_b (and T, K, Z, or any ``TrainConfig`` field).

A sweep is a base config, a search space and a sampler. Each trial is an ordinary run folder
(``das_core.training.loop.train``), scored by one number its ``summary.json`` records
(``val.R@1`` by default: the last epoch's validation R@1). The study lives in a SQLite file in
the sweep folder (``das_core.store.sweeps`` holds the layout), so a sweep resumes where it
stopped, and several processes, on one machine or on several sharing the folder, add trials to
the same study::

    python -m das_core sweep --preset cpu-quick --das --val-fraction 0.2 \\
        --param r_s=0.001:0.3 --param r_b=0:1 --sampler tpe --trials 20 --out runs/sweep1

Search-space syntax (``--param NAME=SPEC``): ``low:high`` a range (``low:high:log`` on a log
scale; whole numbers for an integer field), ``v1,v2,...`` explicit values. ``NAME`` is a
``TrainConfig`` field or one of the paper's symbols ``r_s r_b T K Z``. The grid sampler takes
explicit values only; TPE takes both.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import socket
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from das_core.training.config import SELECT_METRICS, ConfigError, TrainConfig, field_base

log = logging.getLogger("das_core.sweep")

# The paper's symbols for the DAS fields (the names the study records).
ALIASES = {"r_s": "das_r_s", "r_b": "das_r_b", "T": "das_num_produce", "K": "das_topk", "Z": "das_bank_size"}
SYMBOLS = {field: symbol for symbol, field in ALIASES.items()}
SAMPLERS = ("grid", "tpe")
DIRECTIONS = ("maximize", "minimize")
METRIC_SPLITS = ("val", "test")
NOT_SWEPT = ("out",)  # each trial's run folder is set by the sweep
DEFAULT_TPE_TRIALS = 20
MAX_TRIALS = 100_000
MAX_CORNERS = 4096  # combinations of range ends / values checked before any work

Sampler = Literal["grid", "tpe"]
Direction = Literal["maximize", "minimize"]
Value = bool | int | float | str


@dataclass(frozen=True)
class Param:
    """One dimension of the search space: a ``TrainConfig`` field and either a range
    (``low``, ``high``, ``log``) or explicit ``values``."""

    name: str
    kind: Literal["bool", "int", "float", "str"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    values: tuple[Value, ...] | None = None

    @property
    def label(self) -> str:
        """The name in the study and on the plots: the paper's symbol where there is one."""
        return SYMBOLS.get(self.name, self.name)

    @property
    def is_range(self) -> bool:
        return self.values is None

    def spec(self) -> str:
        """The ``NAME=SPEC`` text this parameter is parsed from (``parse_param`` round-trips it)."""
        if self.values is not None:
            return f"{self.label}=" + ",".join(_fmt(v) for v in self.values)
        assert self.low is not None and self.high is not None
        return f"{self.label}={_fmt(self.low)}:{_fmt(self.high)}" + (":log" if self.log else "")

    def ends(self) -> tuple[Value, ...]:
        """The values to check before a sweep starts: both ends of a range, or every value."""
        if self.values is not None:
            return self.values
        assert self.low is not None and self.high is not None
        if self.kind == "int":
            return (int(self.low), int(self.high))
        return (float(self.low), float(self.high))

    def suggest(self, trial: Any) -> Value:
        """Ask an Optuna trial for this parameter's value."""
        if self.values is not None:
            return typing.cast(Value, trial.suggest_categorical(self.label, list(self.values)))
        assert self.low is not None and self.high is not None
        if self.kind == "int":
            return int(trial.suggest_int(self.label, int(self.low), int(self.high), log=self.log))
        return float(trial.suggest_float(self.label, float(self.low), float(self.high), log=self.log))


def _fmt(v: Value) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return format(v, "g")
    return str(v)


def shown_values(values: Mapping[str, Any]) -> str:
    """``r_s=0.01, r_b=0.5``: a trial's values keyed by ``TrainConfig`` field, under the
    paper's symbols (the log, the errors and the runs table all write them so)."""
    return ", ".join(f"{SYMBOLS.get(k, k)}={_fmt(v)}" for k, v in values.items())


def field_kind(name: str) -> Literal["bool", "int", "float", "str"]:
    """How a sweep value of the field is read; a list field (``lr_milestones``) takes text,
    one list per value, checked by the config (``lr_milestones=200,250`` sweeps (200,) and (250,))."""
    base, _ = field_base(name)
    kinds: dict[Any, Literal["bool", "int", "float", "str"]] = {
        bool: "bool", int: "int", float: "float", str: "str", tuple: "str",
    }
    return kinds[base]


def resolve_name(name: str) -> str:
    """``r_s`` -> ``das_r_s``, ``das-topk`` -> ``das_topk``; ``ConfigError`` for an unknown name."""
    text = name.strip()
    field = ALIASES.get(text, text.replace("-", "_"))
    if field in NOT_SWEPT:
        raise ConfigError("param", name, "the sweep sets each trial's run folder itself; sweep another option")
    if field not in TrainConfig.field_names():
        raise ConfigError(
            "param",
            name,
            "unknown option; sweep r_s, r_b, T, K, Z or a training option (see `python -m das_core train --help`)",
        )
    return field


def _parse_value(kind: str, text: str, name: str) -> Value:
    t = text.strip()
    try:
        if kind == "bool":
            if t.lower() in ("true", "yes", "on", "1"):
                return True
            if t.lower() in ("false", "no", "off", "0"):
                return False
            raise ValueError(t)
        if kind == "int":
            return int(t)
        if kind == "float":
            v = float(t)
            if not math.isfinite(v):
                raise ValueError(t)
            return v
    except ValueError:
        what = {"bool": "true or false", "int": "a whole number", "float": "a finite number"}[kind]
        raise ConfigError("param", f"{name}={text}", f"{t!r} is not {what}") from None
    if not t:
        raise ConfigError("param", f"{name}={text}", "an empty value")
    return t


def parse_param(text: str) -> Param:
    """``r_s=0.001:0.3``, ``r_b=0:1:log``, ``T=1,3,5``, ``loss=triplet,margin`` -> ``Param``."""
    name, sep, spec = text.partition("=")
    if not sep or not name.strip() or not spec.strip():
        raise ConfigError(
            "param", text, "write NAME=LOW:HIGH (a range), NAME=LOW:HIGH:log or NAME=V1,V2,... (values), e.g. r_s=0.001:0.3"
        )
    field = resolve_name(name)
    kind = field_kind(field)
    label = SYMBOLS.get(field, field)
    spec = spec.strip()
    if ":" in spec and "," not in spec:
        parts = spec.split(":")
        log_scale = len(parts) == 3 and parts[2].strip().lower() == "log"
        if len(parts) not in (2, 3) or (len(parts) == 3 and not log_scale):
            raise ConfigError("param", text, "a range is LOW:HIGH or LOW:HIGH:log")
        if kind not in ("int", "float"):
            raise ConfigError("param", text, f"{label} is a {kind} option: give its values, e.g. {label}=a,b")
        low, high = (_parse_value(kind, p, label) for p in parts[:2])
        assert isinstance(low, int | float) and isinstance(high, int | float)
        if not low < high:
            raise ConfigError("param", text, f"the range's low end must be below its high end ({low} >= {high})")
        if log_scale and low <= 0:
            raise ConfigError("param", text, "a log-scale range needs a low end above 0")
        return Param(field, kind, low=float(low), high=float(high), log=log_scale)
    values = tuple(_parse_value(kind, p, label) for p in spec.split(","))
    if len(set(values)) != len(values):
        raise ConfigError("param", text, "a value is listed twice")
    return Param(field, kind, values=values)


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep is: validated by ``validate`` (``ConfigError`` naming the problem)."""

    base: TrainConfig
    params: tuple[Param, ...]
    sampler: Sampler = "tpe"
    n_trials: int | None = None  # trials the study should finish; None: the grid's size, or 20 for TPE
    metric: str = "val.R@1"
    direction: Direction = "maximize"
    sampler_seed: int | None = None

    # -- validation --------------------------------------------------------------------------
    def validate(self) -> None:
        if not self.params:
            raise ConfigError("param", None, "name at least one option to search, e.g. --param r_s=0.001:0.3")
        names = [p.name for p in self.params]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ConfigError("param", SYMBOLS.get(dup, dup), "searched twice; give each option once")
        if self.sampler not in SAMPLERS:
            raise ConfigError("sampler", self.sampler, "must be one of " + ", ".join(SAMPLERS))
        if self.direction not in DIRECTIONS:
            raise ConfigError("direction", self.direction, "must be one of " + ", ".join(DIRECTIONS))
        if self.sampler == "grid":
            ranged = next((p for p in self.params if p.is_range), None)
            if ranged is not None:
                raise ConfigError(
                    "param",
                    ranged.spec(),
                    f"the grid sampler takes explicit values, e.g. {ranged.label}=0.01,0.05,0.1; a range needs --sampler tpe",
                )
        if self.n_trials is not None and not (1 <= self.n_trials <= MAX_TRIALS):
            raise ConfigError("trials", self.n_trials, f"must be between 1 and {MAX_TRIALS:,}")
        if self.sampler_seed is not None and not (0 <= self.sampler_seed < 2**32):
            raise ConfigError("sampler_seed", self.sampler_seed, "must be between 0 and 2**32 - 1")
        self._validate_metric()
        self._validate_das()
        self._validate_values()

    def _validate_metric(self) -> None:
        split, _, name = self.metric.partition(".")
        if split not in METRIC_SPLITS or name not in SELECT_METRICS:
            raise ConfigError(
                "metric",
                self.metric,
                "write SPLIT.METRIC with SPLIT one of val, test and METRIC one of " + ", ".join(SELECT_METRICS)
                + " (e.g. val.R@1)",
            )
        if split == "val" and not (self.base.val_classes or self.base.val_fraction):
            raise ConfigError(
                "metric",
                self.metric,
                "needs a validation split, and the base config has none: set --val-fraction 0.2 (or --val-classes N), "
                "or score on test.R@1 (choosing on the test set: for comparison only)",
            )

    def _validate_das(self) -> None:
        das_on = self.base.das or any(p.name == "das" and True in (p.values or ()) for p in self.params)
        das_param = next((p for p in self.params if p.name.startswith("das_")), None)
        if das_param is not None and not das_on:
            raise ConfigError(
                "param",
                das_param.label,
                "acts only with DAS on, and the base config trains without it: add --das (or start from a DAS preset)",
            )

    def _validate_values(self) -> None:
        """Every end of every range and every value, alone and in every combination (up to
        ``MAX_CORNERS``), gives a valid config: an impossible search space is refused before
        the first trial, with the rule it breaks."""
        for p in self.params:
            for v in p.ends():
                try:
                    self.base.replace(**{p.name: v})
                except ConfigError as exc:
                    raise ConfigError(p.label, v, f"{exc.allowed} (in the search space {p.spec()})") from None
        corners = list(itertools.product(*(p.ends() for p in self.params)))
        for combo in corners[:MAX_CORNERS]:
            values = {p.name: v for p, v in zip(self.params, combo, strict=True)}
            try:
                self.base.replace(**values)
            except ConfigError as exc:
                shown = shown_values(values)
                raise ConfigError("param", shown, f"this combination is impossible: {exc}") from None

    # -- derived -----------------------------------------------------------------------------
    def grid(self) -> dict[str, list[Value]]:
        """The grid sampler's search space (label -> values)."""
        return {p.label: list(p.values or ()) for p in self.params}

    def grid_size(self) -> int:
        return math.prod(len(p.values or ()) for p in self.params)

    def target(self) -> int:
        """How many finished trials the study should hold: ``n_trials``, at most the grid's size."""
        if self.sampler == "grid":
            return min(self.n_trials or self.grid_size(), self.grid_size())
        return self.n_trials or DEFAULT_TPE_TRIALS

    def metric_parts(self) -> tuple[str, str]:
        split, _, name = self.metric.partition(".")
        return split, name

    def trial_config(self, values: Mapping[str, Value], out: Path) -> TrainConfig:
        return self.base.replace(**dict(values), out=str(out))

    # -- on disk (sweep.json) ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        base = self.base.to_dict()
        base["out"] = None
        return {
            "base": base,
            "params": [p.spec() for p in self.params],
            "sampler": self.sampler,
            "n_trials": self.n_trials,
            "metric": self.metric,
            "direction": self.direction,
            "sampler_seed": self.sampler_seed,
        }

    def identity(self) -> dict[str, Any]:
        """What every worker of one study must agree on (not how many trials, nor where a
        worker computes)."""
        d = self.to_dict()
        d.pop("n_trials")
        d["base"] = {k: v for k, v in d["base"].items() if k not in ("device", "num_workers", "eval_batch_size")}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweepConfig:
        if not isinstance(d, Mapping):
            raise ConfigError("sweep", d, "must be a mapping")
        params = d.get("params")
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            raise ConfigError("params", params, "must be a list of NAME=SPEC texts")
        n_trials = d.get("n_trials")
        seed = d.get("sampler_seed")
        for key, value in (("n_trials", n_trials), ("sampler_seed", seed)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(key, value, "must be a whole number or null")
        base = d.get("base")
        sweep = cls(
            base=TrainConfig.from_mapping(base if isinstance(base, Mapping) else {}),
            params=tuple(parse_param(p) for p in params),
            sampler=typing.cast(Sampler, str(d.get("sampler", "tpe"))),
            n_trials=n_trials,
            metric=str(d.get("metric", "val.R@1")),
            direction=typing.cast(Direction, str(d.get("direction", "maximize"))),
            sampler_seed=seed,
        )
        sweep.validate()
        return sweep

    def with_trials(self, n_trials: int | None) -> SweepConfig:
        return dataclasses.replace(self, n_trials=n_trials)


def build_sweep(
    base: TrainConfig,
    params: Sequence[str],
    *,
    sampler: str = "tpe",
    n_trials: int | None = None,
    metric: str = "val.R@1",
    direction: str = "maximize",
    sampler_seed: int | None = None,
) -> SweepConfig:
    """A validated ``SweepConfig`` from the CLI's (or the app's) texts."""
    sweep = SweepConfig(
        base=base.replace(out=None) if base.out is not None else base,
        params=tuple(parse_param(p) for p in params),
        sampler=typing.cast(Sampler, sampler),
        n_trials=n_trials,
        metric=metric,
        direction=typing.cast(Direction, direction),
        sampler_seed=sampler_seed,
    )
    sweep.validate()
    return sweep


def metric_value(summary: Mapping[str, Any], metric: str) -> float | None:
    """The number ``metric`` (``val.R@1``) names in a run's ``summary.json``: the last epoch's."""
    split, _, name = metric.partition(".")
    last = summary.get("last")
    scores = last.get(split) if isinstance(last, Mapping) else None
    value = scores.get(name) if isinstance(scores, Mapping) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


# -- running ------------------------------------------------------------------------------------


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fail_running(folder: Path, sweep: SweepConfig, numbers: Sequence[int]) -> None:
    from optuna.trial import TrialState

    from das_core.store import sweeps as layout

    study = layout.open_study(folder, sweep)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number in numbers:
            study.tell(t.number, state=TrialState.FAIL)
            log.info("trial %d: interrupted, marked failed", t.number)


def fail_dead_local_trials(study: Any) -> list[int]:
    """Mark failed, at once, the running trials whose worker was a process on this machine
    that no longer exists (killed, or the machine rebooted): a resumed sweep must not wait
    for their heartbeat to go stale, nor count them as trials in progress. Trials of other
    machines are left to the heartbeat. Returns their numbers."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if not isinstance(worker, str):
            continue
        where, _, pid = worker.rpartition(":")
        if where == host and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            study.tell(t.number, state=TrialState.FAIL)
            failed.append(t.number)
            log.info("trial %d: its worker (pid %s) is gone; marked failed", t.number, pid)
    return failed

TrialHook = Callable[[dict[str, Any]], None]


def _sampler(sweep: SweepConfig) -> Any:
    import optuna

    if sweep.sampler == "grid":
        return optuna.samplers.GridSampler(sweep.grid(), seed=sweep.sampler_seed)
    # constant_liar: a worker treats the trials other workers are running as if they had scored
    # badly, so parallel workers do not all try the same spot.
    return optuna.samplers.TPESampler(seed=sweep.sampler_seed, constant_liar=True)


def run_sweep(
    sweep: SweepConfig,
    out: str | Path,
    *,
    show_progress: bool | None = False,
    worker_trials: int | None = None,
    on_trial: TrialHook | None = None,
) -> dict[str, Any]:
    """Add trials to the sweep in ``out`` until its study holds ``sweep.target()`` finished
    trials (counting those other workers run or are running), or this worker has tried
    ``worker_trials``, and return the sweep's summary. A second call, or a second process,
    with the same sweep joins the same study."""
    import optuna
    from optuna.trial import TrialState

    from das_core.store import sweeps as layout
    from das_core.training.loop import TrainingError, train

    sweep.validate()
    if worker_trials is not None and not (1 <= worker_trials <= MAX_TRIALS):
        raise ConfigError("worker_trials", worker_trials, f"must be between 1 and {MAX_TRIALS:,}")
    folder = Path(out)
    layout.prepare_sweep_folder(folder, sweep)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = layout.open_study(folder, sweep, sampler=_sampler(sweep), heartbeat=True)
    target = sweep.target()
    worker = _worker_name()

    def counts() -> tuple[int, int]:
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        done = sum(t.state == TrialState.COMPLETE for t in trials)
        return done, len(trials) - done

    mine: list[int] = []  # the trials this worker started (for the clean-up on an interrupt)

    def objective(trial: optuna.Trial) -> float:
        mine.append(trial.number)
        trial.set_user_attr("worker", worker)
        values = {p.name: p.suggest(trial) for p in sweep.params}
        run_dir = layout.trial_dir(folder, trial.number)
        trial.set_user_attr("run_dir", run_dir.name)
        cfg = sweep.trial_config(values, run_dir)
        shown = shown_values(values)
        log.info("trial %d (%s) -> %s", trial.number, shown, run_dir)
        layout.write_progress(folder, state="training", trial=trial.number, done=counts()[0], target=target)
        result = train(cfg, show_progress=show_progress)
        summary = layout.read_run_summary(result.out_dir)
        value = metric_value(summary, sweep.metric)
        if value is None:
            raise TrainingError(f"trial {trial.number}: {result.out_dir}/summary.json records no {sweep.metric}")
        last = summary.get("last")
        for split in METRIC_SPLITS:
            scores = last.get(split) if isinstance(last, dict) else None
            if isinstance(scores, dict):
                trial.set_user_attr(split, scores)
        log.info("trial %d: %s = %.4f", trial.number, sweep.metric, value)
        return value

    def enough(study_: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        done, running = counts()
        if on_trial is not None:
            on_trial({"trial": frozen.number, "state": frozen.state.name.lower(), "value": frozen.value,
                      "done": done, "target": target})
        if done + running >= target:
            study_.stop()

    with warnings.catch_warnings():  # a trial whose worker died (no heartbeat for a while) is failed first
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    fail_dead_local_trials(study)
    done, running = counts()
    if done + running < target:
        # n_trials bounds this worker's own attempts (failed trials count), so a trial that
        # always fails cannot loop forever; the callback stops it once the study has enough.
        attempts = min(target - done, worker_trials or MAX_TRIALS)
        try:
            study.optimize(objective, n_trials=attempts, callbacks=[enough], catch=(TrainingError,))
        except KeyboardInterrupt:
            # Ctrl-C, or SIGTERM from a cancelled job (the CLI turns it into this). Optuna
            # records the trial as failed itself, unless the interrupt hit its own database
            # work; then this worker's trials still RUNNING are failed here, on a new connection.
            _fail_running(folder, sweep, mine)
            raise
    else:
        log.info("the study in %s already holds %d finished and %d running trials (target %d)",
                 folder, done, running, target)
    summary = layout.write_summary(folder)
    done = counts()[0]
    layout.write_progress(folder, state="done" if done >= target else "stopped", trial=None, done=done, target=target)
    return summary
