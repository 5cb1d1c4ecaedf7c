"""Helpers for the reliability tests: small checkpoints, edited headers, and running the CLI
on a bad input to check it answers with its own message, not the last-resort one."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from das_core.crashlog import LAST_RESORT
from das_core.models import build_model
from das_core.store.checkpoint import save_checkpoint
from das_core.training.config import TrainConfig
from das_core.training.losses import build_criterion


def small_checkpoint(path: Path, *, class_names: list[str] | None = None) -> Path:
    cfg = TrainConfig.from_mapping({"embedding_dim": 8, "dataset": "digits"})
    model = build_model(cfg, pretrained=False)
    return save_checkpoint(
        path,
        model=model,
        config=cfg,
        class_names=class_names or [str(i) for i in range(5)],
        dataset="digits",
        preprocessing=model.preprocessing,
        metrics={"test": {"R@1": 0.5}},
        epoch=2,
    )


def split_file(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_with_header(path: Path, header_bytes: bytes, body: bytes) -> Path:
    header_bytes += b" " * ((8 - len(header_bytes) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + body)
    return path


def edited(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of checkpoint ``src`` whose header was changed by ``edit`` (metadata under
    ``header["__metadata__"]``)."""
    header, body = split_file(src)
    edit(header)
    return write_with_header(dst, json.dumps(header).encode(), body)


def legacy(path: Path, *, das: bool = False, **changes: Any) -> Path:
    """A legacy ``.pt`` checkpoint (format 0) with some fields replaced; ``das``: trained with
    DAS, its state saved under ``"das"``."""
    cfg = TrainConfig.from_mapping({"embedding_dim": 8, "dataset": "digits", "das": das})
    model = build_model(cfg, pretrained=False)
    obj = {
        "format": "das-explorer",
        "config": cfg.to_dict(),
        "class_names": list("abcde"),
        "dataset": "digits",
        "preprocessing": json.loads(model.preprocessing.to_json()),
        "model": model.state_dict(),
        "metrics": {},
        "epoch": 2,
    }
    if das:
        crit = build_criterion(cfg, num_classes=5)
        assert crit.das is not None
        obj["das"] = crit.das.state_dict()
    obj.update(changes)
    torch.save(obj, path)
    return path


def cli_refuses(capsys: pytest.CaptureFixture[str], args: list[str], *expected: str) -> str:
    """Run the CLI: it must fail with a user-error line (exit 2) holding every ``expected``
    text, short, never the last-resort handler's message."""
    from das_core.cli import main

    code = main(args)
    err = capsys.readouterr().err
    assert LAST_RESORT not in err, err[:2000]
    assert code == 2, err[:2000]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err[:2000]
    for text in expected:
        assert text in line, line[:2000]
    assert len(line) < 2000
    return line
