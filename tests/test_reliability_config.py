"""Issue 14, defects 3, 4 and 7: YAML alias bombs, huge numbers, a run folder name too long,
and config errors that never embed an unbounded value."""

from __future__ import annotations

from pathlib import Path

import pytest

from das_core.training.config import ConfigError, TrainConfig, load_config_file
from tests.reliability_helpers import cli_refuses


def _bomb(levels: int) -> str:
    parts = ["&a0 [" + ", ".join(["1"] * 10) + "]"]
    parts += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "dataset: [" + ", ".join(parts) + "]\n"


@pytest.mark.parametrize("levels", [8, 9])
def test_alias_bomb_is_refused_with_a_short_message(levels: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "bomb.yaml"
    p.write_text(_bomb(levels))
    assert p.stat().st_size < 600  # the file (386 bytes, 8 levels) and one more level
    with pytest.raises(ConfigError, match="aliases") as err:
        load_config_file(p)
    assert len(str(err.value)) < 400
    cli_refuses(capsys, ["train", "--config", str(p), "--dry-run"], "aliases")


def test_small_aliases_still_work_and_a_bad_aliased_value_is_cut(tmp_path: Path) -> None:
    p = tmp_path / "ok.yaml"
    p.write_text("lr: &v 0.01\nweight_decay: *v\n")
    assert load_config_file(p) == {"lr": 0.01, "weight_decay": 0.01}
    # A value that is legal YAML but a huge structure: the message shows a cut piece of it.
    big = [[list(range(50)) for _ in range(50)] for _ in range(3)]
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_mapping({"dataset": big})
    assert "(list of 3)" in str(err.value) and len(str(err.value)) < 400


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lr: 1" + "0" * 400 + "\n", "a number of 401 digits"),
        ("epochs: " + "9" * 5001 + "\n", "a number of 5,001 digits"),
        ("lr: 1" + "0" * 400 + ".5\n", "a number of"),
        ("a: " + "[" * 20_000 + "\n", "refused"),
    ],
)
def test_huge_numbers_and_deep_nesting_are_refused(text: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config_file(p)
    cli_refuses(capsys, ["train", "--config", str(p), "--dry-run"], expected)


def test_huge_int_for_a_float_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="too large") as err:
        TrainConfig.from_mapping({"lr": 10**400})
    assert "digits" in str(err.value) and len(str(err.value)) < 300


def test_config_that_is_not_a_mapping_is_a_config_error() -> None:
    for value in ([1, 2], None, "abc", 5):
        with pytest.raises(ConfigError, match="must be a mapping"):
            TrainConfig.from_mapping(value)  # type: ignore[arg-type]


def test_out_with_a_300_character_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / ("r" * 300)
    with pytest.raises(ConfigError, match="300 characters long"):
        TrainConfig.from_mapping({"out": str(out)})
    cli_refuses(capsys, ["train", "--dataset", "digits", "--out", str(out), "--dry-run"], "300 characters long")
    cli_refuses(capsys, ["train", "--out", str(out), "--resume"], "300 characters long")


def test_a_huge_config_file_is_refused_unread(tmp_path: Path) -> None:
    p = tmp_path / "big.yaml"
    p.write_text("# " + "x" * 2_000_000 + "\nlr: 0.1\n")
    with pytest.raises(ConfigError, match="is not a config file"):
        load_config_file(p)
