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
