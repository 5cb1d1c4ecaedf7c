from __future__ import annotations

from pathlib import Path

import pytest

from das_core.config import (
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
    from das_core.losses import LOSSES as LOSS_REGISTRY
    from das_core.miners import MINER_NAMES
    from das_core.models import BACKBONE_NAMES

    assert tuple(LOSS_REGISTRY) == LOSSES
    assert MINER_NAMES == MINERS
    assert BACKBONE_NAMES == BACKBONES
    assert DATASET_NAMES == DATASETS


def test_every_preset_is_valid() -> None:
    from das_core.presets import PRESETS

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
