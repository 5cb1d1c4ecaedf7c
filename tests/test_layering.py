"""The layers stay apart: data flows one way, das_core -> app, never back, and pages stay thin.

* ``das_core`` never imports ``streamlit`` or ``app`` (statically, anywhere in a module, and at
  run time: importing every das_core module loads neither).
* The app (``streamlit_app.py``, ``app/``) imports no compute library (torch, faiss, umap,
  scikit-learn, scipy): tensor work, kNN, maps and statistics belong in das_core, where they are
  tested; the app renders (numpy, PIL and plotly to draw are fine)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LIBRARY = REPO / "das_core"
APP_FILES = [REPO / "streamlit_app.py", *sorted((REPO / "app").rglob("*.py"))]
COMPUTE = ("torch", "torchvision", "faiss", "umap", "pynndescent", "sklearn", "scipy", "pytorch_metric_learning")


def imported_roots(path: Path) -> set[str]:
    """The top-level package of every import in a file (module level or inside functions)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_imported_roots_sees_nested_and_from_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import os.path\nfrom a.b import c\ndef f():\n    import streamlit as st\nfrom . import x\n")
    assert imported_roots(f) == {"os", "a", "streamlit"}


def test_das_core_never_imports_the_app_or_streamlit() -> None:
    offenders = {
        str(p.relative_to(REPO)): sorted(imported_roots(p) & {"streamlit", "app"})
        for p in sorted(LIBRARY.rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_all_of_das_core_loads_no_app_code() -> None:
    modules = sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in LIBRARY.rglob("*.py")
        if p.name != "__main__.py"
    )
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in ('streamlit', 'app'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_the_app_leaves_computing_to_the_library() -> None:
    offenders = {str(p.relative_to(REPO)): sorted(imported_roots(p) & set(COMPUTE)) for p in APP_FILES}
    assert {k: v for k, v in offenders.items() if v} == {}
