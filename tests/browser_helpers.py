"""The real app server and headless Chromium, for the browser tests and ``bench/bench_app.py``.

``AppServer`` runs ``python -m streamlit run streamlit_app.py`` in its own process group
(so that stopping it stops everything it started, save the job workers, which detach on
purpose), with its runs and caches where it is told. ``launch_chromium`` drives Debian's
``/usr/bin/chromium`` through Playwright (never a downloaded browser). The rest reads the
page the way a person would see it: Streamlit's "running" status widget, tracebacks and
error boxes, the Plotly graphs' data, and full-page screenshots of Streamlit's scrolling
main area. ``failure_shot`` keeps a screenshot of a failing test's page.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = Path(os.environ.get("DAS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 1000}

# Streamlit's DOM (1.67): the status widget ("Running…/Stop") exists only while a script runs.
RUNNING = '[data-testid="stStatusWidget"]'
EXCEPTION = '[data-testid="stException"]'
ERROR = '[data-testid="stAlertContentError"]'
SIDEBAR_CHECKPOINT = '[data-testid="stSidebar"] input[aria-label="Checkpoint"]'


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or ``None``."""
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (Debian: apt-get install chromium; `make browser` does it as root)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is missing (pip install -r requirements-dev.txt)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AppServer:
    """``streamlit run streamlit_app.py`` on a free port, with its own runs and cache folders."""

    def __init__(self, runs_dir: Path, cache_dir: Path, *, log_path: Path | None = None, threads: int = 1,
                 env: Mapping[str, str] | None = None, port: int | None = None) -> None:
        self.runs_dir = Path(runs_dir)
        self.cache_dir = Path(cache_dir)
        self.log_path = Path(log_path) if log_path else self.cache_dir.parent / "server.log"
        self.threads = threads
        self.extra_env = dict(env or {})
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> float:
        """Start it and wait for ``/_stcore/health``; the seconds that took."""
        env = dict(os.environ)
        env.update({
            "DAS_RUNS_DIR": str(self.runs_dir),
            "DAS_CACHE_DIR": str(self.cache_dir),
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
            "NUMBA_NUM_THREADS": str(self.threads),
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        })
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "streamlit", "run", "streamlit_app.py",
            "--server.headless", "true", "--server.port", str(self.port), "--server.address", "127.0.0.1",
            "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
        ]  # fmt: skip
        self.started_at = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app server exited ({self.proc.returncode}):\n{self.log_tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - self.started_at
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"the app server was not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL 10 s later if anything is left."""
        if self.proc is None:
            return
        pid = self.proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # stragglers of the group, even when the leader is gone
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.proc = None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def stop_jobs(runs_root: Path, timeout: float = 30.0) -> list[str]:
    """Cancel every active job under ``runs_root``, then make sure its worker and training
    processes are gone (they run in sessions of their own, outside the server's group).
    Returns what had to be killed by hand."""
    from das_core import jobs

    killed: list[str] = []
    if not runs_root.is_dir():
        return killed
    for job in jobs.list_jobs(runs_root):
        if job.active:
            with contextlib.suppress(Exception):
                jobs.cancel(job.id, runs_root, grace=2.0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(j.active for j in jobs.list_jobs(runs_root)):
        time.sleep(0.2)
    for job in jobs.list_jobs(runs_root):
        if job.pid and _alive(job.pid) and _cmdline_has(job.pid, str(job.run_dir)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(job.pid, signal.SIGKILL)
            killed.append(f"training {job.id} (pid {job.pid})")
    for dev in jobs.DEVICES:
        pid = jobs.worker_pid(runs_root, dev)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
            killed.append(f"{dev} worker (pid {pid})")
    return killed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/status").read_text().find("State:\tZ") >= 0:
            return False
    return True


def _cmdline_has(pid: int, text: str) -> bool:
    try:
        return text in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


# -- the browser ----------------------------------------------------------------------------------


@contextlib.contextmanager
def launch_chromium(headless: bool = True) -> Iterator[Any]:
    """A Playwright browser context on Debian's Chromium with a fresh user data dir."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="das-chromium-") as profile, sync_playwright() as pw:
        # locale and time zone pinned: the page must not format numbers or times after the
        # machine's LANG / TZ
        ctx = pw.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=headless, args=CHROMIUM_ARGS,
            viewport=VIEWPORT, accept_downloads=True, locale="en-US", timezone_id="UTC",
        )
        try:
            yield ctx
        finally:
            ctx.close()


def parse_frame(payload: Any, message_type: Any) -> Any:
    """A websocket frame of Streamlit's protocol as ``message_type`` (ForwardMsg / BackMsg),
    or None for a text frame or one that does not parse."""
    if isinstance(payload, str):
        return None
    msg = message_type()
    try:
        msg.ParseFromString(payload)
    except Exception:
        return None
    return msg


class RunWatcher:
    """Streamlit's own word on script runs, read off the page's websocket: every rerun request
    the browser sends (``BackMsg.rerun_script``) and every ``new_session`` (a run starts) and
    ``script_finished`` (it ends) the server sends, with ``time.perf_counter()`` stamps. (Events
    are delivered while Playwright is called, so waits poll the page every 10 ms.)"""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.events: list[tuple[float, str]] = []
        page.on("websocket", self._on_ws)

    def _on_ws(self, ws: Any) -> None:
        if "_stcore/stream" in ws.url:
            ws.on("framereceived", self._received)
            ws.on("framesent", self._sent)

    def _received(self, payload: Any) -> None:
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        msg = parse_frame(payload, ForwardMsg)
        if msg is None:
            return
        kind = msg.WhichOneof("type")
        if kind == "new_session":
            self.events.append((time.perf_counter(), "start"))
        elif kind == "script_finished":
            status = ForwardMsg.ScriptFinishedStatus.Name(msg.script_finished)
            self.events.append((time.perf_counter(), f"finished:{status}"))

    def _sent(self, payload: Any) -> None:
        from streamlit.proto.BackMsg_pb2 import BackMsg

        msg = parse_frame(payload, BackMsg)
        if msg is None:
            return
        if msg.WhichOneof("type") == "rerun_script":
            self.events.append((time.perf_counter(), "rerun"))

    @property
    def mark(self) -> int:
        """A bookmark: wait_finished(after=mark) waits for a run that ends after it."""
        return len(self.events)

    def wait_finished(self, after: int, timeout: float = 120.0) -> float:
        """Wait for a run (or fragment run) ending after bookmark ``after`` that was not cut
        short by a newer rerun; the ``perf_counter`` time its end arrived."""
        deadline = time.perf_counter() + timeout
        while True:
            for t, kind in self.events[after:]:
                if kind.startswith("finished:") and kind != "finished:FINISHED_EARLY_FOR_RERUN":
                    return t
            if time.perf_counter() > deadline:
                raise TimeoutError(f"no script run finished within {timeout:.0f} s: {self.events[after:]}")
            self.page.wait_for_timeout(10)

    def first(self, kind: str, after: int) -> float | None:
        return next((t for t, k in self.events[after:] if k.startswith(kind)), None)


def is_running(page: Any) -> bool:
    return bool(page.locator(RUNNING).count())


def wait_idle(page: Any, timeout: float = 120.0, settle: float = 0.8, start_grace: float = 0.0) -> float:
    """Wait until no script has been running for ``settle`` seconds; the time waited.
    ``start_grace``: first give a just-requested rerun that long to show up."""
    t0 = time.perf_counter()
    if start_grace:
        with contextlib.suppress(Exception):
            page.wait_for_selector(RUNNING, timeout=start_grace * 1000)
    quiet_since: float | None = None
    while True:
        now = time.perf_counter()
        if is_running(page):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= settle:
            return now - t0
        if now - t0 > timeout:
            raise TimeoutError(f"the app was still running after {timeout:.0f} s")
        time.sleep(0.05)


def pick_checkpoint(page: Any, label: str, timeout: float = 60.0) -> bool:
    """Choose ``label`` (e.g. ``run · digits-das``) in the sidebar's checkpoint picker; False if
    it was chosen already."""
    box = page.locator(SIDEBAR_CHECKPOINT)
    box.wait_for(timeout=timeout * 1000)
    if box.input_value() == label:
        return False
    box.click()
    page.get_by_role("option", name=label, exact=True).click()
    deadline = time.monotonic() + timeout
    while box.input_value() != label:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the checkpoint picker shows {box.input_value()!r}, not {label!r}")
        time.sleep(0.05)
    return True


def problems(page: Any, allow_errors: tuple[str, ...] = ()) -> list[str]:
    """Tracebacks and error boxes on the page (errors containing one of ``allow_errors`` are
    expected ones)."""
    out = [f"traceback: {t[:500]}" for t in page.locator(EXCEPTION).all_inner_texts()]
    out += [f"error: {t[:300]}" for t in page.locator(ERROR).all_inner_texts()
            if not any(a in t for a in allow_errors)]
    return out


# JS: the Plotly graph inside the element with Streamlit key ``key`` (class st-key-<key>).
GRAPH_JS = """(key) => {
  const root = document.querySelector('.st-key-' + key) || document;
  return root.querySelector('.js-plotly-plot');
}"""

# JS: a summary of the traces of a graph: name, type, count and a checksum of x/y.
TRACES_JS = """(key) => {
  const root = document.querySelector('.st-key-' + key);
  const gd = root && root.querySelector('.js-plotly-plot');
  if (!gd || !gd._fullData || !gd._fullLayout) return null;
  return gd._fullData.map(t => {
    const x = t.x || [], y = t.y || [];
    let s = 0;
    for (let i = 0; i < x.length; i++) { const a = +x[i], b = +y[i]; if (a === a) s += a * 1.000003 + b * 0.999991 * (i % 7 + 1); }
    return {name: String(t.name || ''), type: t.type, mode: t.mode || null, n: x.length || (t.z ? t.z.length : 0), sum: s};
  });
}"""


def traces(page: Any, key: str) -> list[dict[str, Any]] | None:
    return page.evaluate(TRACES_JS, key)


def produced_signature(page: Any, key: str = "explore_map") -> tuple[int, float] | None:
    """(number of produced points, checksum of their positions) on a map, or None before it is drawn."""
    tr = traces(page, key)
    if not tr:
        return None
    prod = [t for t in tr if t["name"].startswith("produced")]
    if not prod:
        return None
    return sum(t["n"] for t in prod), round(sum(t["sum"] for t in prod), 6)


def wait_for_produced(page: Any, key: str = "explore_map", timeout: float = 120.0) -> tuple[int, float]:
    page.wait_for_function(
        """(key) => { const r = document.querySelector('.st-key-' + key);
                      const gd = r && r.querySelector('.js-plotly-plot');
                      return !!(gd && gd._fullData && gd._fullLayout && gd._fullData.some(t => String(t.name).startsWith('produced'))); }""",
        arg=key, timeout=timeout * 1000,
    )
    sig = produced_signature(page, key)
    assert sig is not None
    return sig


def full_screenshot(page: Any, path: Path, settle: float = 1.0, max_height: int = 12000) -> Path:
    """A screenshot of the whole page: Streamlit scrolls inside ``stMain``, so the viewport is
    made as tall as its content first (and put back afterwards)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size or VIEWPORT
    height = page.evaluate(
        """() => { const m = document.querySelector('[data-testid="stMain"]');
                   const s = document.querySelector('[data-testid="stSidebarContent"]');
                   return Math.max(m ? m.scrollHeight : 0, s ? s.scrollHeight : 0, window.innerHeight); }"""
    )
    try:
        page.set_viewport_size({"width": size["width"], "height": min(int(height) + 8, max_height)})
        time.sleep(settle)  # Plotly redraws on resize
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.set_viewport_size(size)
    return path


def failure_shot(page: Any, test_name: str) -> Path | None:
    """A full-page screenshot of a failing test's page in ``tests/artifacts/<test name>.png``."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in test_name)
    try:
        return full_screenshot(page, ARTIFACTS / f"{name}.png", settle=0.2)
    except Exception:  # never hide the test's own failure
        return None
