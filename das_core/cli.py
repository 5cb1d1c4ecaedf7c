"""``python -m das_core``: train, evaluate, inspect checkpoints, fetch datasets.

The ``train`` flags are generated from ``das_core.training.config.TrainConfig``: one declaration per
option serves the flags, the YAML config file and the app's Train form.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from das_core.training.config import ConfigError, TrainConfig, field_base, load_config_file
from das_core.training.ranges import BY_FIELD as DAS_RANGE_FIELDS

# Short aliases for the paper's symbols.
ALIASES = {
    "das_num_produce": ["-T"],
    "das_topk": ["-K"],
    "das_bank_size": ["-Z"],
}


def _optional(conv: Any) -> Any:
    def parse(text: str) -> Any:
        if text.lower() in ("none", "null", ""):
            return None
        return conv(text)

    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field; unset flags are absent from the namespace (so that
    a ``--config`` file's values are only overridden by flags actually given)."""
    defaults = TrainConfig()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        rule = TrainConfig.rule(f.name)
        group = groups.setdefault(rule.group, parser.add_argument_group(f"{rule.group} options"))
        flag = "--" + f.name.replace("_", "-")
        names = [flag, *ALIASES.get(f.name, [])]
        default = getattr(defaults, f.name)
        base, optional = field_base(f.name)
        if base is tuple:  # a list of whole numbers, given as E1,E2 (parsed and checked by the config)
            default = ",".join(str(v) for v in default) or "none"
        help_text = f"{rule.help} (default: {default})"
        if f.name in DAS_RANGE_FIELDS:  # the range of das_core.training.ranges, as the config checks it
            help_text = f"{rule.help} ({DAS_RANGE_FIELDS[f.name].describe()}; default: {default})"
        if base is bool:
            group.add_argument(
                *names, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
            continue
        conv: Any = {int: int, float: float, str: str, tuple: str}[base]
        group.add_argument(
            *names,
            dest=f.name,
            type=_optional(conv) if optional else conv,
            choices=rule.choices,
            default=argparse.SUPPRESS,
            metavar=rule.metavar or (None if rule.choices else f.name.upper()),
            help=help_text,
        )
    das_group = groups["das"]
    das_group.add_argument(
        "--dfs-only", dest="das_mode", action="store_const", const="dfs", default=argparse.SUPPRESS, help="DAS with scaling only (ablation)"
    )
    das_group.add_argument(
        "--mts-only", dest="das_mode", action="store_const", const="mts", default=argparse.SUPPRESS, help="DAS with shifting only (ablation)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m das_core",
        description="DAS Explorer: Densely-Anchored Sampling for deep metric learning.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser(
        "train",
        help="train an embedding model",
        description="Train an embedding model. Values come from the defaults, then --preset, then --config "
        "FILE (YAML), then the flags given.",
    )
    tr.add_argument("--config", dest="config_file", default=None, help="YAML file of options (flags override it)")
    tr.add_argument("--preset", default=None, help="start from a named preset (see `python -m das_core presets`)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar (plain log lines only)")
    tr.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then stop")
    add_config_flags(tr)

    add_sweep_parser(sub)

    ev = sub.add_parser("evaluate", help="print the metrics of a checkpoint on its dataset")
    ev.add_argument("checkpoint", help="a .safetensors checkpoint or a run folder")
    ev.add_argument("--split", default="test", choices=("train", "val", "test"))
    ev.add_argument("--data-root", default=None, help="dataset folder, if not where the run found it")
    ev.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")

    info = sub.add_parser("info", help="show a checkpoint's metadata")
    info.add_argument("checkpoint")

    pr = sub.add_parser("presets", help="list the training presets")
    pr.add_argument("--json", action="store_true", help="every preset's fully resolved config as one JSON object")

    data = sub.add_parser("data", help="locate or download datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    chk = dsub.add_parser("check", help="say where a dataset is found and how big its splits are")
    chk.add_argument("name")
    chk.add_argument("--root", default=None)
    chk.add_argument("--size", type=int, default=None, help="emoji-styles: the rendered size in pixels (default 64)")
    dl = dsub.add_parser("download", help="download and extract a dataset (emoji-styles: install and render)")
    dl.add_argument("name")
    dl.add_argument("--root", default=None, help="target folder (default: data/<name>)")
    dl.add_argument("--size", type=int, default=None, help="emoji-styles: render at this many pixels (default 64)")
    demo = sub.add_parser("demo", help="the embedded demo checkpoints")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True)
    build = demo_sub.add_parser("build", help="retrain the demo checkpoints into assets/demo (make demo-model)")
    build.add_argument("--epochs", type=int, default=None, help="override the preset's epochs (testing only)")
    build.add_argument("--dataset", default=None, help="rebuild only the demos on this dataset (e.g. emoji-styles)")
    demo_sub.add_parser("path", help="print the demo checkpoints' paths")
    ex = sub.add_parser(
        "export",
        help="export a split's embeddings and map (Parquet, TensorBoard projector)",
        description="Export the embeddings of a split, their UMAP map (the Explore page's) and the points DAS "
        "produces, as a Parquet file (pandas, FiftyOne, Embedding Atlas) or TensorBoard projector files.",
    )
    ex.add_argument("source", help="a .safetensors checkpoint, a run folder, or an embeddings file (.npz, .parquet)")
    ex.add_argument("--split", default="test", choices=("train", "val", "test"),
                    help="the split to export (an embeddings file has one set: ignored)")
    ex.add_argument("--format", dest="fmt", required=True, choices=("tensorboard", "parquet"))
    ex.add_argument("--out", required=True, help="output folder (created)")
    ex.add_argument("--das-anchors", type=int, default=50,
                    help="real points per class that DAS produces from (0: no DAS points; default 50, as Explore)")
    ex.add_argument("--r-s", type=float, default=None, help="r_s for the DAS points (default: the source's)")
    ex.add_argument("--r-b", type=float, default=None, help="r_b for the DAS points (default: the source's)")
    ex.add_argument("--data-root", default=None, help="dataset folder, if not where the run found it")
    ex.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    from das_core.store.jobs import add_jobs_parser

    add_jobs_parser(sub)
    return parser


def add_sweep_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sw = sub.add_parser(
        "sweep",
        help="search r_s, r_b (or any option) with Optuna; each trial is a run folder",
        description="Search training options with Optuna. The base config comes from the defaults, then "
        "--preset, then --config FILE, then the flags given; --param names what is searched. The study is a "
        "SQLite file in --out: run the same command again (or `sweep --out DIR` alone), in as many processes "
        "or machines sharing the folder as you like, to resume it or add workers.",
        epilog="examples: --param r_s=0.001:0.3 (a range)  --param r_b=0.001:1:log (log scale)  "
        "--param T=1,3,5 (values; the grid sampler takes values only)",
    )
    sw.add_argument("--param", dest="params", action="append", default=[], metavar="NAME=SPEC",
                    help="an option to search: NAME=LOW:HIGH, NAME=LOW:HIGH:log or NAME=V1,V2,...; NAME is a "
                    "training option or r_s, r_b, T, K, Z (repeat the flag for each option)")
    sw.add_argument("--sampler", default=None, choices=("grid", "tpe"), help="grid (every combination of the values) "
                    "or tpe (Optuna's Tree-structured Parzen Estimator; default)")
    sw.add_argument("--trials", type=int, default=None, help="finished trials the study should hold, all workers "
                    "together (default: the grid's size, or 20 for tpe)")
    sw.add_argument("--worker-trials", type=int, default=None, help="this process runs at most this many trials "
                    "(default: until the study has --trials)")
    sw.add_argument("--metric", default=None, help="what scores a trial, from its summary.json: SPLIT.METRIC, e.g. "
                    "val.R@1 (default; needs --val-fraction or --val-classes) or test.MAP@R")
    sw.add_argument("--direction", default=None, choices=("maximize", "minimize"), help="default: maximize")
    sw.add_argument("--sampler-seed", type=int, default=None, help="seed of the sampler (default: fresh)")
    sw.add_argument("--config", dest="config_file", default=None, help="YAML file of the base config's options")
    sw.add_argument("--preset", default=None, help="start the base config from a named preset")
    sw.add_argument("--no-progress", action="store_true", help="no progress bars (plain log lines only)")
    sw.add_argument("--show", action="store_true", help="print the sweep in --out (trials, best) as JSON and stop")
    add_config_flags(sw)


def resolve_train_config(args: argparse.Namespace) -> TrainConfig:
    from das_core.training.presets import get_preset

    values: dict[str, Any] = {}
    if args.preset:
        values.update(get_preset(args.preset).values)
    if args.config_file:
        values.update(load_config_file(args.config_file))
    names = set(TrainConfig.field_names())
    values.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig.from_mapping(values)


def _print_table(rows: dict[str, dict[str, float]]) -> None:
    keys = list(next(iter(rows.values())).keys())
    print("split  " + "  ".join(f"{k:>7}" for k in keys))
    for split, m in rows.items():
        print(f"{split:<6} " + "  ".join(f"{100 * m[k]:7.2f}" for k in keys))
    print("(percent)")


def cmd_train(args: argparse.Namespace) -> int:
    from das_core.training.loop import resolve_resume_config, train

    if args.resume:
        out = getattr(args, "out", None)
        if not out:
            raise ConfigError("out", None, "--resume needs --out RUN_FOLDER (the run to continue)")
        from pathlib import Path

        names = set(TrainConfig.field_names()) - {"out"}
        overrides = {k: v for k, v in vars(args).items() if k in names}
        cfg = resolve_resume_config(Path(out), overrides)
    else:
        cfg = resolve_train_config(args)
    if args.dry_run:
        print(json.dumps(cfg.grouped(), indent=2))
        return 0
    result = train(cfg, resume=args.resume, show_progress=False if args.no_progress else None)
    print(f"run folder: {result.out_dir}")
    last = result.last
    rows: dict[str, dict[str, float]] = {s: last[s] for s in ("val", "test") if s in last}
    if rows:
        _print_table(rows)
    if result.selected_epoch is not None:
        print(f"selected epoch (best validation {cfg.select_metric}): {result.selected_epoch} -> best.safetensors")
    _print_best_test(_best_test_of_run(result.out_dir))
    return 0


def _best_test_of_run(run_dir: Any) -> dict[str, Any] | None:
    """The clearly labelled best-test-epoch figure of a run folder's ``summary.json`` (or None)."""
    from pathlib import Path

    from das_core.store.io import read_json_object
    from das_core.store.layout import RunLayout

    summary = read_json_object(RunLayout(Path(run_dir)).summary) or {}
    best = summary.get("best_test_epoch")
    return best if isinstance(best, dict) else None


def _print_best_test(best: dict[str, Any] | None) -> None:
    if best is None:
        return
    print(
        f"paper-style figure (NOT a model selection: best epoch on the test set, as the authors report): "
        f"test {best.get('metric')} {100 * float(best.get('value', float('nan'))):.2f} at epoch {best.get('epoch')}"
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    import signal
    import time
    from pathlib import Path

    from das_core.store import sweeps
    from das_core.store.runs import default_runs_root
    from das_core.training.sweep import build_sweep, run_sweep

    out = getattr(args, "out", None)
    if args.show:
        if not out:
            raise ConfigError("out", None, "--show needs --out SWEEP_FOLDER")
        print(sweeps.dumps(sweeps.load_sweep(out)))
        return 0
    names = set(TrainConfig.field_names()) - {"out"}
    if not args.params:
        if not out or not sweeps.is_sweep(Path(out)):
            raise ConfigError(
                "param", None, "name an option to search (--param r_s=0.001:0.3), or join a sweep with --out SWEEP_FOLDER"
            )
        given = sorted(k for k in vars(args) if k in names)
        given += [f for f, v in (("preset", args.preset), ("config", args.config_file), ("sampler", args.sampler),
                                 ("metric", args.metric), ("direction", args.direction)) if v is not None]
        if given:
            raise ConfigError(
                given[0].replace("_", "-"), getattr(args, given[0], None),
                f"joining the sweep in {out} uses its saved settings; give --out (and --trials) only",
            )
        sweep = sweeps.read_sweep_config(Path(out))
        if args.trials is not None:
            sweep = sweep.with_trials(args.trials)
            sweep.validate()
    else:
        if hasattr(args, "out"):
            delattr(args, "out")  # the sweep's folder, not the base config's run folder
        sweep = build_sweep(
            resolve_train_config(args), args.params, sampler=args.sampler or "tpe", n_trials=args.trials,
            metric=args.metric or "val.R@1", direction=args.direction or "maximize", sampler_seed=args.sampler_seed,
        )
        out = out or str(default_runs_root() / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")

    def stop(signum: int, frame: object) -> None:  # a cancelled job: the running trial is recorded as failed
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    summary = run_sweep(sweep, out, show_progress=False if args.no_progress else None, worker_trials=args.worker_trials)
    view = sweeps.load_sweep(out)
    print(f"sweep folder: {out}  ({sweep.sampler}, {sweep.metric}, {sweep.direction})")
    for t in view.trials:
        params = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        value = f"{t.value:.4f}" if t.value is not None else "-"
        print(f"  trial {t.number:>4}  {t.state:<9} {params:<40} {sweep.metric} {value}")
    best = summary.get("best")
    if isinstance(best, dict):
        print(f"best: trial {best['trial']} ({sweep.metric} {best['value']:.4f}) -> {Path(out) / best['run_dir']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from das_core.retrieval.evaluation import evaluate_embeddings
    from das_core.runtime import resolve_device
    from das_core.store.checkpoint import load_checkpoint
    from das_core.training.loop import load_splits_for

    ckpt = load_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    model = ckpt.build_model(device)
    splits = load_splits_for(ckpt.config, args.data_root)
    from das_core.models.embed import embed_dataset

    emb, labels = embed_dataset(model, splits.get(args.split), batch_size=args.batch_size, device=device)
    metrics = evaluate_embeddings(emb, labels)
    best = _best_test_of_run(ckpt.path.parent)
    if args.json:
        extra = {"best_test_epoch": best} if best is not None else {}
        print(json.dumps({"checkpoint": str(ckpt.path), "split": args.split, **metrics, **extra}, indent=2))
    else:
        print(f"{ckpt.path}  ({ckpt.dataset}, {args.split} split: {len(labels)} images, {len(set(labels.tolist()))} classes)")
        _print_table({args.split: metrics})
        _print_best_test(best)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from das_core.store.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    best = _best_test_of_run(ckpt.path.parent)
    extra = {"best_test_epoch": best} if best is not None else {}
    print(json.dumps({**ckpt.summary(), "metrics": ckpt.metrics, **extra, "config": ckpt.config.to_dict()}, indent=2))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from das_core.training.presets import PRESETS

    if getattr(args, "json", False):
        print(json.dumps({name: preset.config().to_dict() for name, preset in PRESETS.items()}, indent=2))
        return 0
    for name, preset in PRESETS.items():
        print(f"{name:<24} {preset.description}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from das_core.data import load_splits

    if args.name == "emoji-styles":
        from das_core.data.emoji_styles import cmd_emoji_styles

        return cmd_emoji_styles(args.data_command, args.root, args.size)
    if args.data_command == "download":
        from pathlib import Path

        from das_core.data.download import download_dataset

        path = download_dataset(args.name, Path(args.root) if args.root else None)
        print(f"{args.name} is ready in {path}")
        return 0
    splits = load_splits(args.name, args.root)
    for note in splits.notes:
        print(f"note: {note}")
    print(f"{splits.name}: found in {splits.source}")
    for name in splits.available():
        ds = splits.get(name)
        print(f"  {name:<5} {len(ds):>7} images  {ds.num_classes:>6} classes")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from das_core.store.demo import available_demos, build_demo

    if args.demo_command == "build":
        for path in build_demo(epochs=args.epochs, dataset=args.dataset):
            print(f"wrote {path}")
        return 0
    for path in available_demos():
        print(path)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from das_core.explorer.export import export_source
    from das_core.runtime import resolve_device

    if args.das_anchors < 0:
        raise ConfigError("das_anchors", args.das_anchors, "must be >= 0 (0: no DAS points)")
    path = export_source(
        args.source, args.out, args.fmt, args.split, das_anchors_per_class=args.das_anchors, r_s=args.r_s,
        r_b=args.r_b, data_root=args.data_root, device=str(resolve_device(args.device)),
    )
    print(f"wrote {path}")
    if args.fmt == "tensorboard":
        print(f"open it with: tensorboard --logdir {path.parent}  (the Projector tab)")
    return 0


COMMANDS = {
    "demo": cmd_demo,
    "train": cmd_train,
    "sweep": cmd_sweep,
    "evaluate": cmd_evaluate,
    "info": cmd_info,
    "presets": cmd_presets,
    "data": cmd_data,
    "export": cmd_export,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    try:
        return _run(args)
    except Exception as exc:  # the last resort: one line here, the traceback in a log file
        from das_core.crashlog import last_resort_message

        print(f"error: {last_resort_message(exc, f'python -m das_core {args.command}')}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "jobs":  # before das_core.errors: the long-lived queue worker never loads torch
        from das_core.store.jobs import cmd_jobs

        return cmd_jobs(args)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from das_core.errors import USER_ERRORS

    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last finished epoch's checkpoint is kept", file=sys.stderr)
        return 130
