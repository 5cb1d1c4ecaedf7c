"""The browser tests' fixtures, a pytest plugin (``pytest_plugins`` in ``conftest.py``): one app
server and one Chromium per test module, and a new tab per test.

A module that uses them defines only ``app_root``: a folder whose ``runs/`` the server serves
(and whose ``cache/`` it caches in; ``server.log`` gets its output). Everything else here is the
same for every browser test: the server stops, and so do the jobs it queued, at the end of the
module; each tab (each its own Streamlit session) carries the ``RunWatcher`` that
``launch_chromium`` attached when it was created (``page.runs``) and the browser-side errors
seen on it (``page.js_errors``, see ``browser_helpers.assert_clean``), and a failing test leaves
a full-page screenshot of it in ``tests/artifacts/<test>.png``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_helpers import AppServer, failure_shot, launch_chromium, new_tab, stop_jobs


@pytest.fixture(scope="module")
def server(app_root: Path) -> Iterator[AppServer]:
    srv = AppServer(app_root / "runs", app_root / "cache", log_path=app_root / "server.log", threads=1)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        stop_jobs(app_root / "runs")  # job workers detach from the server: stopped by hand


@pytest.fixture(scope="module")
def browser(server: AppServer) -> Iterator[Any]:
    with launch_chromium() as ctx:
        yield ctx


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A new tab (a new Streamlit session); browser-side errors are collected on it, and a
    failing test leaves a screenshot of it in tests/artifacts/."""
    p = new_tab(browser)
    failed_before = request.session.testsfailed
    try:
        yield p
    finally:
        # the call's report is in by now: a new failure is this test's
        if request.session.testsfailed > failed_before:
            print(f"screenshot of the failing page: {failure_shot(p, request.node.name)}")
        p.close()
