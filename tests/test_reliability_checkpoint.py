"""Issue 14, defects 1, 9 and the minor ones: every malformed checkpoint (metadata, header,
legacy .pt, NaN weights, a FIFO) gets one clear CheckpointError, the same for every reader."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from das_core.store.checkpoint import CheckpointError, load_checkpoint
from tests.reliability_helpers import (
    cli_refuses,
    edited,
    legacy,
    small_checkpoint,
    split_file,
    write_with_header,
)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_checkpoint(tmp_path_factory.mktemp("good") / "good.safetensors")


def _set(key: str, value: Any) -> Any:
    def edit(header: dict[str, Any]) -> None:
        header["__metadata__"][key] = value

    return edit


def _config(value: Any) -> Any:
    def edit(header: dict[str, Any]) -> None:
        cfg = json.loads(header["__metadata__"]["config"])
        cfg["lr"] = value
        header["__metadata__"]["config"] = json.dumps(cfg)

    return edit


BAD_METADATA = {
    "epoch-abc": (_set("epoch", "abc"), "'epoch' must be a whole number"),
    "epoch-fraction": (_set("epoch", "1.5"), "'epoch' must be a whole number"),
    "config-list": (_set("config", "[1, 2]"), "'config' must be a JSON object"),
    "config-null": (_set("config", "null"), "'config' must be a JSON object"),
    "config-string": (_set("config", '"abc"'), "'config' must be a JSON object"),
    "config-not-json": (_set("config", "abc"), "'config' is not valid JSON"),
    "format-version-null": (_set("format_version", None), "metadata must map names to strings"),
    "format-version-list": (_set("format_version", [1]), "metadata must map names to strings"),
    "format-version-text": (_set("format_version", "one"), "'format_version' must be a whole number"),
    "lr-huge": (_config(10**400), "lr="),
    "lr-nan": (lambda h: _config(0)(h) or h["__metadata__"].update(config=h["__metadata__"]["config"].replace('"lr": 0', '"lr": NaN')), "must be a finite number"),
    "class-names-ints": (_set("class_names", "[1, 2, 3]"), "'class_names' must be a list of names"),
    "class-names-object": (_set("class_names", '{"a": 1}'), "'class_names' must be a JSON list"),
    "preprocessing-bad": (_set("preprocessing", '{"mode": "X"}'), "'preprocessing' is invalid"),
    "preprocessing-huge": (_set("preprocessing", '{"mode": "L", "resize": 1e400, "crop": 1, "mean": [0], "std": [1]}'), "'preprocessing' is invalid"),
    "metrics-list": (_set("metrics", "[1]"), "'metrics' must be a JSON object"),
    "metrics-text": (_set("metrics", '{"test": {"R@1": "high"}}'), "'metrics' entry"),
    "metadata-list": (lambda h: h.update(__metadata__=["x"]), "metadata must map names to strings"),
    "offsets-infinity": (lambda h: next(v for k, v in h.items() if k != "__metadata__").update(data_offsets=[0, float("inf")]), "malformed safetensors header entry"),
    "offsets-negative": (lambda h: next(v for k, v in h.items() if k != "__metadata__").update(data_offsets=[-1, 4]), "malformed safetensors header entry"),
    "entry-not-object": (lambda h: h.update(extra=[1, 2]), "malformed safetensors header entry"),
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_bad_metadata_is_one_clear_checkpoint_error(case: str, good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit, expected = BAD_METADATA[case]
    bad = edited(good, tmp_path / f"{case}.safetensors", edit)
    with pytest.raises(CheckpointError, match=None) as err:
        load_checkpoint(bad)
    assert expected in str(err.value) and str(bad) in str(err.value)
    assert len(str(err.value)) < 1000
    cli_refuses(capsys, ["info", str(bad)], expected)


def test_deeply_nested_header_is_refused(good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, body = split_file(good)
    bad = write_with_header(tmp_path / "deep.safetensors", b"[" * 100_000, body)
    with pytest.raises(CheckpointError, match="header is not JSON"):
        load_checkpoint(bad)
    cli_refuses(capsys, ["info", str(bad)], "header is not JSON")


def test_huge_values_are_cut_in_the_message(good: Path, tmp_path: Path) -> None:
    bad = edited(good, tmp_path / "long.safetensors", _set("epoch", "x" * 1_000_000))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert "1,000,000 characters" in str(err.value) and len(str(err.value)) < 600


LEGACY_BAD = {
    "epoch-abc": ({"epoch": "abc"}, "'epoch' must be a whole number"),
    "epoch-fraction": ({"epoch": "1.5"}, "'epoch' must be a whole number"),
    "config-list": ({"config": [1, 2]}, "'config' must be a JSON object"),
    "config-none": ({"config": None}, "'config' must be a JSON object"),
    "config-string": ({"config": "abc"}, "'config' must be a JSON object"),
    "class-names-ints": ({"class_names": [1, 2]}, "'class_names' must be a list of names"),
    "model-list": ({"model": [torch.zeros(2)]}, "legacy DAS Explorer file"),
}


@pytest.mark.parametrize("case", sorted(LEGACY_BAD))
def test_bad_legacy_pt_is_one_clear_checkpoint_error(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    changes, expected = LEGACY_BAD[case]
    bad = legacy(tmp_path / f"{case}.pt", **changes)
    with pytest.raises(CheckpointError, match=None) as err:
        load_checkpoint(bad)
    assert expected in str(err.value)
    cli_refuses(capsys, ["info", str(bad)], expected)


def test_non_string_class_names_do_not_load(tmp_path: Path) -> None:
    p = small_checkpoint(tmp_path / "m.safetensors", class_names=[1, 2, 3])  # type: ignore[list-item]
    with pytest.raises(CheckpointError, match="class_names"):
        load_checkpoint(p)


def test_nan_weights_are_refused_when_the_model_is_built(good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file, save_file

    header, _ = split_file(good)
    tensors = load_file(str(good))
    name = next(k for k, v in tensors.items() if k.startswith("model.") and v.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata=header["__metadata__"])
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_checkpoint(bad).build_model()
    cli_refuses(capsys, ["evaluate", str(bad), "--device", "cpu"], "NaN or infinite", name)


def test_info_on_a_fifo_does_not_hang(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    cli_refuses(capsys, ["info", str(fifo)], "not a regular file")


def test_a_name_too_long_is_a_checkpoint_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli_refuses(capsys, ["info", str(tmp_path / ("x" * 300))], "characters)")
