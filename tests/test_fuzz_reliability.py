"""Issue 14: fuzz every file a user can hand us (checkpoint metadata and headers, YAML configs,
run folders, job.json). Each generated input is accepted or refused with the reader's own error
(a message), never another exception; hypothesis's deadline bounds the time of each, and the
readers' size limits bound the memory. Kept small (max_examples) to fit make test's budget."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from das_core.explorer import runs_view
from das_core.store import jobs
from das_core.store.checkpoint import CheckpointError, load_checkpoint
from das_core.training.config import ConfigError, TrainConfig, load_config_file
from das_core.training.loop import (
    TrainingError,
    _check_metrics_file,
    _load_train_state,
    resolve_resume_config,
)
from tests.reliability_helpers import small_checkpoint, split_file, write_with_header

FUZZ = settings(max_examples=40, deadline=10_000, suppress_health_check=[HealthCheck.too_slow], database=None)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
META_KEYS = ("format", "format_version", "code_version", "config", "class_names", "dataset", "preprocessing",
             "metrics", "epoch", "created")


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_checkpoint(tmp_path_factory.mktemp("fuzz") / "good.safetensors")


def _accepted_or_checkpoint_error(path: Path) -> None:
    try:
        ckpt = load_checkpoint(path)
        ckpt.summary()
        ckpt.build_model()
    except CheckpointError as exc:
        assert len(str(exc)) < 2000


@FUZZ
@given(
    key=st.sampled_from(META_KEYS),
    value=st.one_of(st.text(max_size=40), json_values.map(lambda v: json.dumps(v, allow_nan=True)), json_values),
)
def test_fuzz_checkpoint_metadata(good: Path, key: str, value: Any) -> None:
    header, body = split_file(good)
    header["__metadata__"][key] = value
    with tempfile.TemporaryDirectory() as tmp:
        p = write_with_header(Path(tmp) / "f.safetensors", json.dumps(header).encode(), body)
        _accepted_or_checkpoint_error(p)


@FUZZ
@given(field=st.sampled_from(sorted(TrainConfig.field_names())), value=json_values)
def test_fuzz_checkpoint_config_values(good: Path, field: str, value: Any) -> None:
    header, body = split_file(good)
    cfg = json.loads(header["__metadata__"]["config"])
    cfg[field] = value
    header["__metadata__"]["config"] = json.dumps(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        p = write_with_header(Path(tmp) / "f.safetensors", json.dumps(header).encode(), body)
        _accepted_or_checkpoint_error(p)


@FUZZ
@given(entry=json_values, raw=st.binary(max_size=64))
def test_fuzz_checkpoint_header(good: Path, entry: Any, raw: bytes) -> None:
    header, body = split_file(good)
    name = next(k for k in header if k != "__metadata__")
    header[name] = entry
    with tempfile.TemporaryDirectory() as tmp:
        _accepted_or_checkpoint_error(write_with_header(Path(tmp) / "a.safetensors", json.dumps(header).encode(), body))
        _accepted_or_checkpoint_error(write_with_header(Path(tmp) / "b.safetensors", raw, body))


yaml_docs = st.one_of(
    st.text(max_size=200),
    st.dictionaries(st.sampled_from([*TrainConfig.field_names(), "das", "loss", "junk"]), json_values, max_size=5).map(
        lambda d: __import__("yaml").safe_dump(d)
    ),
    st.lists(st.sampled_from(["a: &x [1, 2]", "b: *x", "lr: 1e999", "epochs: 99999999999999999999", "- [", "!!python/object:os.system {}",
                              "dataset: {das: 1}", "? [1]\n: 2", "<<: *x"]), max_size=5).map("\n".join),
)


@FUZZ
@given(doc=yaml_docs)
def test_fuzz_yaml_config(doc: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "c.yaml"
        p.write_bytes(doc.encode("utf-8", "replace"))
        try:
            TrainConfig.from_mapping(load_config_file(p))
        except ConfigError as exc:
            assert len(str(exc)) < 2000


metrics_lines = st.lists(
    st.one_of(json_values.map(lambda v: json.dumps(v)), st.dictionaries(st.sampled_from(["epoch", "train_loss", "test", "val"]), json_values).map(json.dumps), st.text(max_size=30)),
    max_size=6,
)


@FUZZ
@given(lines=metrics_lines, config=yaml_docs, state=st.binary(max_size=200), info=json_values)
def test_fuzz_run_folder(lines: list[str], config: str, state: bytes, info: Any) -> None:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8", errors="replace")
        (run / "config.yaml").write_bytes(config.encode("utf-8", "replace"))
        try:
            _check_metrics_file(run / "metrics.jsonl")
        except TrainingError as exc:
            assert len(str(exc)) < 2000
        try:
            resolve_resume_config(run, {})
        except (TrainingError, ConfigError) as exc:
            assert len(str(exc)) < 2000
        curves = runs_view.run_curves(run)
        assert len(set(curves["epoch"])) == len(curves["epoch"])
        runs_view.run_row(run)
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.Adam(model.parameters())
        for variant in ("raw", "meta"):
            path = run / "train_state.safetensors"
            if variant == "raw":
                path.write_bytes(state)
            else:
                meta = {"param_groups": json.dumps(info), "scalars": "{}", "scaler": "null", "info": json.dumps(info)}
                save_file({"optim.0.exp_avg": torch.zeros(2, 2)}, str(path), metadata=meta)
            try:
                out = _load_train_state(path, optimizer, None)
            except TrainingError as exc:
                assert len(str(exc)) < 2000
            else:
                assert isinstance(out["epoch"], int) and math.isfinite(out["best_value"]) or out["best_value"] == -math.inf


JOB_KEYS = ("id", "run_dir", "device", "state", "created", "started", "finished", "pid", "returncode", "error", "config", "name")


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(JOB_KEYS), json_values, max_size=4),
    raw=st.one_of(st.none(), st.binary(max_size=60)),
)
def test_fuzz_job_json(changes: dict[str, Any], raw: bytes | None) -> None:
    import time

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        good = root / "good"
        good.mkdir()
        (good / "job.json").write_text(json.dumps({"device": "cpu", "state": "done", "created": time.time()}))
        bad = root / "fuzzed"
        bad.mkdir()
        data = {"device": "cpu", "state": "done", "created": time.time(), **changes}
        (bad / "job.json").write_bytes(raw if raw is not None else json.dumps(data).encode())
        if data.get("state") in ("queued", "running"):
            data["state"] = "done"  # no worker or training process is started by a fuzz test
            (bad / "job.json").write_bytes(raw if raw is not None else json.dumps(data).encode())
        found, damaged = jobs.scan_jobs(root)
        assert "good" in [j.id for j in found]
        assert len(found) + len(damaged) == 2
        for d in damaged:
            assert d.id == "fuzzed" and len(d.problem) < 2000
        jobs._print_jobs(found, damaged, as_json=False)
        jobs._print_jobs(found, damaged, as_json=True)
