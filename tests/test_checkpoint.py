from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from das_core.models import build_model
from das_core.store.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    checkpoint_identity,
    load_checkpoint,
    save_checkpoint,
)
from das_core.store.io import file_key
from das_core.training.config import TrainConfig
from das_core.training.losses import build_criterion
from tests.reliability_helpers import edited, legacy, small_checkpoint, split_file


def _save(path: Path, das: bool = True) -> tuple[torch.nn.Module, torch.nn.Module, TrainConfig]:
    cfg = TrainConfig.from_mapping({"embedding_dim": 16, "das": das, "dataset": "digits"})
    model = build_model(cfg)
    crit = build_criterion(cfg, num_classes=5)
    if crit.das is not None:
        crit.das(torch.nn.functional.normalize(torch.randn(10, 16), dim=1), torch.arange(5).repeat(2))
    save_checkpoint(
        path,
        model=model,
        criterion=crit,
        config=cfg,
        class_names=[str(i) for i in range(5)],
        dataset="digits",
        preprocessing=model.preprocessing,
        metrics={"test": {"R@1": 0.5}},
        epoch=3,
    )
    return model, crit, cfg


def test_round_trip_with_das_state(tmp_path: Path) -> None:
    model, crit, cfg = _save(tmp_path / "m.safetensors")
    ckpt = load_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.config == cfg and ckpt.epoch == 3 and ckpt.class_names == list("01234")
    assert ckpt.metrics == {"test": {"R@1": 0.5}}
    assert ckpt.preprocessing == model.preprocessing
    assert ckpt.format_version == FORMAT_VERSION
    rebuilt = ckpt.build_model()
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)
    das = ckpt.build_das()
    assert das is not None and crit.das is not None
    assert torch.equal(das.frequency, crit.das.frequency)
    assert torch.equal(das.bank, crit.das.bank)


def test_run_folder_prefers_best(tmp_path: Path) -> None:
    _save(tmp_path / "last.safetensors")
    assert load_checkpoint(tmp_path).path.name == "last.safetensors"
    _save(tmp_path / "best.safetensors")
    assert load_checkpoint(tmp_path).path.name == "best.safetensors"


def test_identity_is_the_content_taken_at_load(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _save(run / "last.safetensors")
    ckpt = load_checkpoint(run)
    assert ckpt.identity == file_key(run / "last.safetensors") == checkpoint_identity(run)
    assert len(ckpt.identity) == 16
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes((run / "last.safetensors").read_bytes())
    assert load_checkpoint(copy).identity == ckpt.identity  # keyed by content, not by name
    _save(run / "last.safetensors", das=False)  # retrained in place
    assert checkpoint_identity(run) != ckpt.identity
    assert load_checkpoint(run).identity == checkpoint_identity(run)
    assert ckpt.identity == file_key(copy)  # the loaded object keeps what it was loaded from
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_identity(tmp_path / "gone.safetensors")


def test_missing_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="without a checkpoint"):
        load_checkpoint(tmp_path)


def test_truncated_file_is_named(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    _save(p)
    data = p.read_bytes()
    for cut in (4, 40, len(data) - 100):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(tmp_path / "cut.safetensors")
        assert "cut.safetensors" in str(err.value)
        assert "truncated" in str(err.value) or "too short" in str(err.value)


def test_foreign_safetensors_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a DAS Explorer checkpoint.*weight"):
        load_checkpoint(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"hello world, not a model at all")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")


def test_newer_format_says_which_version_wrote_it(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    _save(p)
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"]["format_version"] = str(FORMAT_VERSION + 1)
    header["__metadata__"]["code_version"] = "9.9.9"
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    (tmp_path / "new.safetensors").write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])
    with pytest.raises(CheckpointError, match=r"9\.9\.9.*format 2.*Upgrade"):
        load_checkpoint(tmp_path / "new.safetensors")


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_pickle_carrying_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    with open(p, "wb") as fh:
        pickle.dump({"format": "das-explorer", "model": _Exploit(str(marker))}, fh)
    with pytest.raises(CheckpointError, match="refused.*run code"):
        load_checkpoint(p)
    assert not marker.exists()


def test_legacy_pt_is_migrated(tmp_path: Path) -> None:
    ckpt = load_checkpoint(legacy(tmp_path / "old.pth", das=True))
    assert ckpt.format_version == FORMAT_VERSION and ckpt.has_das and ckpt.epoch == 2
    assert ckpt.build_das() is not None
    torch.save({"state_dict": ckpt.build_model().state_dict()}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a DAS Explorer checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_checkpoints_storing_the_old_string_milestones_still_load(tmp_path: Path) -> None:
    """Checkpoints written before lr_milestones became a tuple store it as text ("200,250", or ""
    for none) in their JSON config: both the safetensors metadata and a legacy .pt still load."""
    new = TrainConfig.from_mapping({"embedding_dim": 8, "dataset": "digits"})

    def old_form(milestones: str) -> dict[str, object]:
        return {**new.to_dict(), "lr_schedule": "multistep" if milestones else "constant", "lr_milestones": milestones}

    def set_config(milestones: str) -> Callable[[dict[str, Any]], None]:
        def edit(header: dict[str, Any]) -> None:
            header["__metadata__"]["config"] = json.dumps(old_form(milestones), sort_keys=True)
        return edit

    src = small_checkpoint(tmp_path / "new.safetensors")
    for text, want in (("200,250", (200, 250)), ("", ())):
        ckpt = load_checkpoint(edited(src, tmp_path / f"old{len(want)}.safetensors", set_config(text)))
        assert ckpt.config.lr_milestones == want
        assert ckpt.config == new.replace(lr_schedule="multistep" if want else "constant", lr_milestones=want)
    old_pt = load_checkpoint(legacy(tmp_path / "old.pt", config=old_form("200,250")))
    assert old_pt.config.lr_milestones == (200, 250) and old_pt.config.lr_schedule == "multistep"
    # a newly saved checkpoint stores the list; it loads back as the same tuple
    saved = small_checkpoint(tmp_path / "again.safetensors")
    header, _ = split_file(saved)
    assert json.loads(header["__metadata__"]["config"])["lr_milestones"] == []


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "m.safetensors"
    _save(p)
    before = p.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        _save(p)
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left
