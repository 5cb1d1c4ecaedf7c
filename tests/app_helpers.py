"""Helpers for the AppTest-based page tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from streamlit.testing.v1 import AppTest

from conftest import REPO


def install_run(run: Path, runs_root: Path, name: str = "digits-das") -> Path:
    """A copy of a run folder under the app's runs root (the picker lists it)."""
    target = runs_root / name
    if not target.exists():
        runs_root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(run, target)
    return target


def app_on(page: str, checkpoint: Path, timeout: float = 240) -> AppTest:
    """The app on ``page`` with ``checkpoint`` chosen in the sidebar picker."""
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=timeout)
    at.session_state["ckpt_path"] = str(checkpoint)
    at.switch_page(page)
    return at.run()


def plotly_specs(at: AppTest) -> list[dict[str, Any]]:
    """The figures of every st.plotly_chart on the page, as Plotly JSON."""
    out = []
    for node in at.get("plotly_chart"):
        spec = node.proto.spec  # type: ignore[attr-defined]
        out.append(json.loads(spec))
    return out


def produced_layers(at: AppTest) -> list[dict[str, Any]]:
    """The payloads of every ``app.produced_layer`` component on the page (the produced points
    that the browser writes into a map's traces), as sent."""
    out = []
    for node in at.get("bidi_component"):
        proto = node.proto  # type: ignore[attr-defined]
        if proto.component_name == "das_produced_layer":
            out.append(json.loads(proto.json))
    return out


def decode(values: Any) -> list[float]:
    """A Plotly array: a plain list, or a base64 typed array ({"dtype", "bdata"})."""
    import base64

    import numpy as np

    if isinstance(values, dict) and "bdata" in values:
        arr = np.frombuffer(base64.b64decode(values["bdata"]), dtype=np.dtype(values["dtype"]))
        return [float(v) for v in arr.reshape(-1)]
    return [float(v) for v in values]


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def fake_checkpoint(src: Path, dst: Path, **config: Any) -> Path:
    """A copy of checkpoint ``src`` at ``dst`` whose config says otherwise (e.g. another dataset)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    cfg = {**json.loads(meta["config"]), **config}
    meta["config"], meta["dataset"] = json.dumps(cfg), cfg["dataset"]
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def digits_runs_root(tmp_path: Path, monkeypatch: Any, digits_run: Path) -> Path:
    """A runs root of the test's own (``$DAS_RUNS_DIR``), holding the digits run as ``digits``."""
    root = tmp_path / "runs"
    root.mkdir()
    (root / "digits").symlink_to(digits_run, target_is_directory=True)
    monkeypatch.setenv("DAS_RUNS_DIR", str(root))
    return root



def make_sweep(runs_root: Path, digits_run: Path, name: str = "rs-sweep") -> Path:
    """A sweep folder under ``runs_root`` written with the library's own writers, as a grid
    sweep over r_s = 0.01, 0.2 (r_b = 0.05) leaves it: ``trial-0000`` finished (a copy of the
    digits run, with the trial's config), ``trial-0001`` still training (metrics of epoch 1
    only, no checkpoint), ``trial-0002`` just started (nothing yet: not a row)."""
    from das_core.store.sweeps import trial_dir, write_sweep_config
    from das_core.training.config import TrainConfig, dump_config, load_config_file
    from das_core.training.sweep import build_sweep

    folder = runs_root / name
    folder.mkdir(parents=True)
    base = TrainConfig.from_mapping(load_config_file(digits_run / "config.yaml"))
    sweep = build_sweep(base, ["r_s=0.01,0.2", "r_b=0.05"], sampler="grid")
    write_sweep_config(folder, sweep)
    done, running, started = (trial_dir(folder, n) for n in range(3))
    shutil.copytree(digits_run, done)
    dump_config(sweep.trial_config({"das_r_s": 0.01, "das_r_b": 0.05}, done), done / "config.yaml")
    running.mkdir()
    dump_config(sweep.trial_config({"das_r_s": 0.2, "das_r_b": 0.05}, running), running / "config.yaml")
    (running / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 0.5, "test": {"R@1": 0.5}}) + "\n")
    started.mkdir()
    return folder
