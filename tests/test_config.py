from __future__ import annotations

from pathlib import Path

import pytest

from das_core.training.config import (
    BACKBONES,
    DATASETS,
    LOSSES,
    MINERS,
    ConfigError,
    TrainConfig,
    dump_config,
    load_config_file,
)


def test_defaults_are_valid() -> None:
    TrainConfig().validate()


@pytest.mark.parametrize(
    ("values", "field", "phrase"),
    [
        ({"das_r_s": 0.0}, "das_r_s", "> 0"),
        ({"das_r_s": 1.0}, "das_r_s", "< 1"),
        ({"das_r_s": 1.5}, "das_r_s", "< 1"),
        ({"das_r_b": -0.1}, "das_r_b", ">= 0"),
        ({"das_topk": 0}, "das_topk", ">= 1"),
        ({"das_topk": 129, "embedding_dim": 128}, "das_topk", "embedding_dim=128"),
        ({"batch_size": 101, "samples_per_class": 20}, "batch_size", "multiple of samples_per_class"),
        ({"batch_size": 20, "samples_per_class": 20}, "batch_size", "at least 2 classes"),
        ({"loss": "hinge"}, "loss", "one of triplet"),
        ({"miner": "hardest"}, "miner", "one of none"),
        ({"backbone": "vgg"}, "backbone", "one of small-cnn"),
        ({"dataset": "imagenet"}, "dataset", "one of fashion-mnist"),
        ({"lr": 0}, "lr", "> 0"),
        ({"epochs": 2.5}, "epochs", "whole number"),
        ({"das": "yes"}, "das", "true or false"),
        ({"loss": "proxy-anchor", "miner": "semi-hard"}, "miner", "takes no miner"),
        ({"val_classes": 1, "val_fraction": 0.1}, "val_fraction", "not both"),
        ({"lr": float("nan")}, "lr", "finite"),
        ({"optimiser": "adam"}, "optimiser", "unknown option"),
    ],
)
def test_impossible_values_are_refused_with_field_value_and_range(values: dict, field: str, phrase: str) -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_mapping(values)
    assert err.value.field == field
    assert phrase in str(err.value)
    assert field in str(err.value)


def test_grouped_mapping_and_flat_mapping_agree() -> None:
    flat = TrainConfig.from_mapping({"das": True, "das_r_s": 0.2, "lr": 0.01, "pddm_alpha": 0.3})
    grouped = TrainConfig.from_mapping({"das": {"enabled": True, "r_s": 0.2}, "optim": {"lr": 0.01}, "pddm": {"alpha": 0.3}})
    assert flat == grouped


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = TrainConfig.from_mapping({"das": True, "loss": "margin", "miner": "distance-weighted", "margin": 0.3})
    dump_config(cfg, tmp_path / "c.yaml")
    again = TrainConfig.from_mapping(load_config_file(tmp_path / "c.yaml"))
    assert again == cfg


def test_bad_yaml_files(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config_file(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")


def test_registries_match_config_names() -> None:
    from das_core.data import DATASET_NAMES
    from das_core.models import BACKBONE_NAMES
    from das_core.training.losses import LOSSES as LOSS_REGISTRY
    from das_core.training.miners import MINER_NAMES

    assert tuple(LOSS_REGISTRY) == LOSSES
    assert MINER_NAMES == MINERS
    assert BACKBONE_NAMES == BACKBONES
    assert DATASET_NAMES == DATASETS


def test_every_preset_is_valid() -> None:
    from das_core.training.presets import PRESETS

    for preset in PRESETS.values():
        preset.config()


def test_cli_flags_override_config_file(tmp_path: Path) -> None:
    from das_core.cli import build_parser, resolve_train_config

    (tmp_path / "c.yaml").write_text("das:\n  enabled: true\n  r_s: 0.2\nlr: 0.01\nepochs: 7\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--das-r-s", "0.3", "-T", "5"])
    cfg = resolve_train_config(args)
    assert cfg.das is True
    assert cfg.das_r_s == 0.3  # the flag wins
    assert cfg.das_num_produce == 5
    assert cfg.lr == 0.01 and cfg.epochs == 7  # the file's values stay where no flag is given


def test_cli_dfs_only_and_no_das(tmp_path: Path) -> None:
    from das_core.cli import build_parser, resolve_train_config

    cfg = resolve_train_config(build_parser().parse_args(["train", "--das", "--dfs-only"]))
    assert cfg.das and cfg.das_mode == "dfs"
    cfg = resolve_train_config(build_parser().parse_args(["train", "--preset", "cpu-demo", "--no-das"]))
    assert not cfg.das and cfg.batch_size == 100


# ------------------------------------------------------------------ one rule per DAS range


def _outside(r: object) -> list[float]:
    """Values just outside each bound of a range (the bound itself when it is open)."""
    from das_core.training.ranges import ParamRange

    assert isinstance(r, ParamRange)
    step = 1 if r.integer else 0.5
    low = r.low if r.low_open else r.low - step
    high = r.high if r.high_open else r.high + step
    return [int(v) if r.integer else float(v) for v in (low, high)]


@pytest.mark.parametrize("symbol", ["T", "K", "Z", "r_s", "r_b", "gamma"])
def test_each_das_range_is_one_rule_for_the_config_the_cli_and_the_module(
    symbol: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table of das_core.training.ranges is what the config checks (so the YAML file, the
    form and the CLI flags), what --help says, and what the DAS module checks: a value outside
    fails in each place with the table's words, and both ends of the range are accepted."""
    from das_core.cli import main
    from das_core.training.das import DenselyAnchoredSampling
    from das_core.training.ranges import DAS_RANGES

    r = DAS_RANGES[symbol]
    rule = r.describe()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for field in r.fields:
        assert TrainConfig.rule(field).describe() == rule
        assert f"({rule}; default:" in help_text, f"--help of {field} states the range"
    dim = 8192  # K's range ends at the largest embedding dimension
    for bad in _outside(r):
        values = {f: bad for f in r.fields}
        if symbol == "gamma":  # both ends given, so that only the range can be the problem
            values = {"das_gamma_low": bad, "das_gamma_high": 100.0} if bad <= 0 else {"das_gamma_low": 0.5, "das_gamma_high": bad}
        with pytest.raises(ConfigError) as err:
            TrainConfig.from_mapping({**values, "embedding_dim": dim})
        assert str(err.value).endswith(f"must be {rule}")
        flag = f"--{next(iter(values)).replace('_', '-')}" if symbol != "gamma" or bad <= 0 else "--das-gamma-high"
        argv = ["train", "--dry-run", "--embedding-dim", str(dim), flag, str(bad)]
        if symbol == "gamma":
            argv += ["--das-gamma-low", "0.5"] if bad > 0 else ["--das-gamma-high", "100"]
        assert main(argv) == 2
        assert f"must be {rule}" in capsys.readouterr().err
        kwarg = (bad, 100.0) if symbol == "gamma" and bad <= 0 else (0.5, bad) if symbol == "gamma" else bad
        with pytest.raises(ValueError, match="must be") as module_err:
            DenselyAnchoredSampling(2, dim, **{r.kwarg: kwarg})  # type: ignore[arg-type]
        assert rule in str(module_err.value)
    # both ends of a closed range are valid in both places (an open end was refused above)
    for end, is_open in ((r.low, r.low_open), (r.high, r.high_open)):
        if is_open or symbol in ("Z", "T", "K"):  # (a bank of 100,000 rows per class is big to build)
            continue
        value = end
        if symbol == "gamma":
            TrainConfig(das_gamma_low=value / 2, das_gamma_high=value).validate()
        else:
            TrainConfig(**{r.fields[0]: value}).validate()
            DenselyAnchoredSampling(2, 8, **{r.kwarg: value})  # type: ignore[arg-type]


def test_slider_ranges_come_from_the_table() -> None:
    """The sliders offer the table's UI range, widened to take a checkpoint's own value (within
    the valid range), never past it; every default config value is inside the UI range."""
    from das_core.training.ranges import DAS_RANGES, R_B, R_S, T

    cfg = TrainConfig()
    assert R_B.slider(cfg.das_r_b) == (R_B.ui_low, R_B.ui_high, cfg.das_r_b) == (0.0, 2.0, 0.01)
    assert R_S.slider(cfg.das_r_s) == (0.001, 0.99, 0.01)
    assert T.slider(cfg.das_num_produce) == (1, 10, 3)
    assert R_B.slider(5.0) == (0.0, 5.0, 5.0)  # a checkpoint trained with r_b = 5 shows 5
    assert R_B.slider(1e9) == (0.0, 2.0, 2.0)  # outside the valid range: clamped, not widened
    assert R_S.slider(0.995) == (0.001, 0.995, 0.995)
    for r in DAS_RANGES.values():
        if r.ui_low is not None and r.ui_high is not None:
            assert r.contains(r.ui_low) and r.contains(r.ui_high), f"{r.symbol}'s slider stays valid"
            for f in r.fields:
                default = getattr(cfg, f)
                assert default is None or r.ui_low <= default <= r.ui_high


def test_das_mode_and_splits_have_one_mapping_each() -> None:
    """das_mode becomes the two DAS switches in one place (das_halves, used by das_kwargs and the
    Explore page's toggles), and a config becomes its splits in one place (split_spec, which
    passes every option load_splits takes)."""
    import dataclasses
    import inspect

    from das_core.data import SplitSpec, load_splits

    for mode, halves in (("both", (True, True)), ("dfs", (True, False)), ("mts", (False, True))):
        cfg = TrainConfig(das_mode=mode)
        assert cfg.das_halves() == halves
        assert (cfg.das_kwargs()["use_dfs"], cfg.das_kwargs()["use_mts"]) == halves
    cfg = TrainConfig(dataset="folder", data_root="/d", train_classes=3, val_fraction=0.2, seed=7, image_size=32)
    spec = cfg.split_spec()
    assert spec == SplitSpec("folder", "/d", 3, 0, 0.2, 7, 32)
    assert cfg.split_spec("/other").data_root == "/other"
    params = [p for p in inspect.signature(load_splits).parameters if p not in ("name", "data_root")]
    assert sorted(params) == sorted(f.name for f in dataclasses.fields(SplitSpec) if f.name not in ("dataset", "data_root"))
    hash(spec)  # the app caches the loaded splits on it
