"""Shared test setup: two threads at most (this machine and CI have 2 cores), runs and
caches in temporary folders, and one small trained digits run reused across tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")

import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

# the browser tests' server / browser / page fixtures (a module defines only its app_root)
pytest_plugins = ["browser_fixtures"]

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"


# Runs and the app's caches never touch the repository's runs/ or .cache/: one temporary
# folder for the whole session (set at import, so module- and session-scoped fixtures see it).
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="das-explorer-tests-"))
os.environ["DAS_RUNS_DIR"] = str(_SESSION_DIR / "runs")
os.environ["DAS_CACHE_DIR"] = str(_SESSION_DIR / "cache")


# The app serves thumbnail sprite sheets from <repo>/static/cache (Streamlit's static file server
# reads only there, so DAS_CACHE_DIR cannot move them). What a session writes there is removed
# at its end: a second run in the same clone starts from the state the first one did.
STATIC = REPO / "static"


@pytest.fixture(scope="session", autouse=True)
def _no_static_cache_left_behind() -> Iterator[None]:
    cache = STATIC / "cache"
    had_static = STATIC.exists()
    before = set(cache.iterdir()) if cache.is_dir() else set()
    yield
    if cache.is_dir():
        for p in set(cache.iterdir()) - before:
            shutil.rmtree(p, ignore_errors=True)
    if not had_static:
        for d in (cache, STATIC):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()


QUICK_DIGITS = [
    "--dataset", "digits",
    "--backbone", "small-cnn",
    "--embedding-dim", "32",
    "--batch-size", "50",
    "--samples-per-class", "10",
    "--epochs", "1",
    "--device", "cpu",
    "--lr", "0.002",
    "--no-progress",
]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch digits run with DAS and a validation split (seconds on CPU)."""
    from das_core.cli import main

    out = tmp_path_factory.mktemp("digits-run") / "run"
    args = ["train", *QUICK_DIGITS, "--epochs", "2", "--das", "--val-fraction", "0.2", "--seed", "3", "--out", str(out)]
    assert main(args) == 0
    return out


MANY_TRAIN, MANY_TEST = 520, 10
MANY_STYLES = ("noto", "twemoji")
MANY_NAMES = [f"emoji {i:04d}" for i in range(MANY_TRAIN + MANY_TEST)]
MANY_ZEBRA = MANY_NAMES[412] = "emoji 0412 zebra face"  # a class to look up by name (sorts in place)


@pytest.fixture(scope="session")
def many_class_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch with DAS of a small CNN on 520 training classes x 2 styles of 8-px images, an
    image folder ``<class>/<style>/img.png`` (seconds on CPU)."""
    from das_core.cli import main
    from fixtures import make_styled_folder

    base = tmp_path_factory.mktemp("many-classes")
    root = make_styled_folder(base / "images", MANY_NAMES, MANY_STYLES)
    out = base / "run"
    args = ["train", "--dataset", "folder", "--data-root", str(root), "--train-classes", str(MANY_TRAIN),
            "--backbone", "small-cnn", "--embedding-dim", "16", "--batch-size", "40", "--samples-per-class", "2",
            "--epochs", "1", "--das", "--device", "cpu", "--no-progress", "--seed", "0", "--out", str(out)]
    assert main(args) == 0
    return out


@pytest.fixture(autouse=True)
def _threads_unchanged() -> object:
    """No test (and no library call it makes) may leave torch's / faiss's shared OpenMP thread
    count changed: later tests' speed and exact float sums depend on it."""
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        pytest.fail(f"the process's thread count went from {before} to {after} and was not restored")
