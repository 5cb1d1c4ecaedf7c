"""The real app server and headless Chromium, for the browser tests and ``bench/bench_app.py``.

``AppServer`` runs ``python -m streamlit run streamlit_app.py`` in its own process group
(so that stopping it stops everything it started, save the job workers, which detach on
purpose), with its runs and caches where it is told. ``launch_chromium`` drives Debian's
``/usr/bin/chromium`` through Playwright (never a downloaded browser), with a ``RunWatcher``
on every page from its creation: it decodes Streamlit's own messages on the page's websocket,
and ``wait_idle`` waits on them (every rerun the page asked for answered by a finished run),
never for a guessed quiet time. The rest reads the page the way a person would see it:
Streamlit's "running" status widget, tracebacks and error boxes, the Plotly graphs' data, and
full-page screenshots of Streamlit's scrolling main area, taken once the graphs are drawn.
``failure_shot`` keeps a screenshot of a failing test's page.
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


def skip_without_chromium() -> None:
    """Skip the calling test module, at its import, when the browser tests cannot run here."""
    why = chromium_missing()
    if why:
        import pytest

        pytest.skip(f"browser tests skipped: {why}", allow_module_level=True)


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
            time.sleep(0.1)  # polled until healthy (or the deadline): nothing to be told by
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
    from das_core.store import jobs

    killed: list[str] = []
    if not runs_root.is_dir():
        return killed
    for job in jobs.list_jobs(runs_root):
        if job.active:
            with contextlib.suppress(Exception):
                jobs.cancel(job.id, runs_root, grace=2.0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(j.active for j in jobs.list_jobs(runs_root)):
        time.sleep(0.2)  # polled: the jobs' files say when they have stopped
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
    """A Playwright browser context on Debian's Chromium with a fresh user data dir. Every page
    it opens gets a ``RunWatcher`` the moment it is created (before it loads anything), so
    ``wait_idle`` sees all of that page's traffic with the app."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="das-chromium-") as profile, sync_playwright() as pw:
        # locale and time zone pinned: the page must not format numbers or times after the
        # machine's LANG / TZ
        ctx = pw.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=headless, args=CHROMIUM_ARGS,
            viewport=VIEWPORT, accept_downloads=True, locale="en-US", timezone_id="UTC",
        )
        ctx.add_init_script(script=STREAM_SOCKETS_JS)
        ctx.on("page", watcher)
        for page in ctx.pages:  # the persistent context opens with one blank tab
            watcher(page)
        try:
            yield ctx
        finally:
            ctx.close()


# -- when the app is idle: Streamlit's own messages, read off the page's websocket ----------------
#
# The browser asks for every script run with a ``BackMsg.rerun_script`` (a widget change, the
# first run of a new session, a reconnect, a fragment's ``run_every`` timer, which the browser
# runs too); the server answers each run with a ``ForwardMsg.new_session`` (it starts) and a
# ``ForwardMsg.script_finished`` (it ends), both tagged with the run's id (``metadata.run``) and,
# for a fragment run, its fragments. What Streamlit 1.67 does with the requests
# (``runtime/app_session.py``, ``scriptrunner_utils/script_requests.py``):
# - a full rerun request while a run goes on stops that run's ScriptRunner and starts a new one;
#   the stopped run then sends no ``script_finished`` at all (its events are dropped), so a run
#   can end silently, superseded by the next ``new_session``;
# - fragment requests queue behind a full run, coalesce with each other (one run for several),
#   and fold into a pending full run; a fragment run cut short by a newer request ends with
#   FINISHED_EARLY_FOR_RERUN and its successor starts at once;
# - a fragment request for a fragment that a full run has removed starts nothing (the full
#   run's ``new_session``, which comes after it, covers it below).
# So ``RunLedger`` does not count replies: a request is answered once a run that covers it
# (a full run covers every request, a fragment run the requests for its fragments) has started
# after it was sent, and the app is idle when no request waits for such a run and the latest
# run has finished (not early). Each websocket is a Streamlit session of its own; only the
# page's newest one counts. The one case this cannot see: a run that the server started before
# it read our request, whose start and end were both still on the wire when we sent it (it
# ended before the server read the request, or ended normally with the request queued behind
# it, as a fragment request waits behind a full run): it looks like the answer until the
# answer's own start arrives. The stream cannot tell (Streamlit's AppSession says as much: its
# agent API keeps a server-side "settled" flag for that reason, which a browser session does
# not get). Such a run needs a request of ours, or an ``st.rerun`` (this app has none), that
# was still unanswered when we sent the next: a test acts on a page that ``wait_idle`` left
# idle, so its own requests never meet the case; a ``run_every`` timer's request can.

# JS, run in every page before its own scripts: count the Streamlit sockets each document opens
# and say whether its newest one is open (``window.__dasStream()``), so that ``wait_idle`` knows
# whether the page has connected yet and whether its connection is a new session's first one.
STREAM_SOCKETS_JS = """(() => {
  const Native = window.WebSocket;
  if (!Native || window.__dasStream) return;
  const state = {sockets: 0, last: null};
  class Tracked extends Native {
    constructor(url, protocols) {
      super(url, protocols);
      if (String(url).includes('_stcore/stream')) { state.sockets += 1; state.last = this; }
    }
  }
  window.WebSocket = Tracked;
  window.__dasStream = () => ({sockets: state.sockets, open: !!state.last && state.last.readyState === 1});
})();"""
STREAM_STATE_JS = "() => window.__dasStream ? window.__dasStream() : null"


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


class Session:
    """One websocket's Streamlit session: the rerun requests not answered yet and the latest run."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.requests = 0  # rerun requests sent on it
        self.waiting: list[str] = []  # unanswered requests: "" for a full run, else the fragment id
        self.run_id: str | None = None  # the latest run that started
        self.run_fragments: tuple[str, ...] = ()
        self.run_status: str | None = None  # how it finished (None: still going)

    def request(self, fragment_id: str) -> None:
        self.requests += 1
        self.waiting.append(fragment_id)

    def started(self, run_id: str, fragments: tuple[str, ...]) -> None:
        if fragments:  # a fragment run answers the requests for its fragments
            self.waiting = [f for f in self.waiting if not f or f not in fragments]
        else:  # a full run answers every request (it runs every fragment too)
            self.waiting = []
        self.run_id, self.run_fragments, self.run_status = run_id, fragments, None

    def finished(self, run_id: str, status: str) -> None:
        # a script_finished without a run id ends the run in progress (Streamlit sends one when
        # handling a request fails); one for an older run (superseded) changes nothing
        if self.run_id is not None and run_id in ("", self.run_id):
            self.run_status = status

    def busy(self, first: bool) -> str | None:
        """Why this session is not idle, or None."""
        if first and self.requests == 0:
            return "the new session has not asked for its first run yet"
        if self.waiting:
            what = ", ".join("full run" if not f else f"fragment {f[:8]}" for f in self.waiting)
            return f"{len(self.waiting)} rerun request(s) not started yet ({what})"
        if self.run_id is not None and self.run_status is None:
            return f"run {self.run_id[:8]} is going"
        if self.run_status == "FINISHED_EARLY_FOR_RERUN":
            return f"run {self.run_id[:8] if self.run_id else '?'} ended early for a rerun that has not started yet"
        return None


class RunLedger:
    """The bookkeeping of ``wait_idle``, fed with the decoded frames of a page's websockets in
    the order the page saw them (pure Python: ``tests/test_wait_idle.py`` checks it on recorded
    frames). The rules are in the comment above ``STREAM_SOCKETS_JS``."""

    def __init__(self) -> None:
        self.sessions: list[Session] = []

    def connect(self) -> Session:
        session = Session(len(self.sessions))
        self.sessions.append(session)
        return session

    @property
    def latest(self) -> Session | None:
        return self.sessions[-1] if self.sessions else None

    def sent(self, session: Session, msg: Any) -> str | None:
        """A BackMsg the page sent; "rerun" for a rerun request."""
        if msg.WhichOneof("type") != "rerun_script":
            return None
        session.request(msg.rerun_script.fragment_id)
        return "rerun"

    def received(self, session: Session, msg: Any) -> str | None:
        """A ForwardMsg the page received; "start" or "finished:<status>" for a run's start / end."""
        kind = msg.WhichOneof("type")
        run = msg.metadata.run
        if kind == "new_session":
            session.started(run.script_run_id, tuple(run.fragment_ids))
            return "start"
        if kind == "script_finished":
            status = type(msg).ScriptFinishedStatus.Name(msg.script_finished)
            session.finished(run.script_run_id, status)
            return f"finished:{status}"
        return None

    def busy(self, first: bool = True) -> str | None:
        """Why the page's newest session is not idle, or None (``first``: it is its document's
        first connection, a new session, which always asks for a run)."""
        if self.latest is None:
            return "the page has no connection to the app yet"
        return self.latest.busy(first)


class RunWatcher:
    """Streamlit's own word on script runs, read off the page's websocket: every rerun request
    the browser sends (``BackMsg.rerun_script``) and every ``new_session`` (a run starts) and
    ``script_finished`` (it ends) the server sends, in ``events`` with ``time.perf_counter()``
    stamps, and in a ``RunLedger`` for ``wait_idle``. Attach it when the page is created
    (``watcher(page)``; ``launch_chromium`` does it for every page). (Events are delivered
    while Playwright is called, so waits poll the page every 10 ms.)

    ``RunWatcher(page)`` on a page that has one already returns that one (a subclass, e.g. the
    app benchmark's, gets one of its own), so that its bookmarks and ``wait_idle``'s agree."""

    def __new__(cls, page: Any) -> RunWatcher:
        found = getattr(page, "_das_watcher", None)
        if type(found) is cls:
            return found
        return super().__new__(cls)

    def __init__(self, page: Any) -> None:
        if getattr(self, "page", None) is page:
            return  # the page's own watcher, returned by __new__
        self.page = page
        self.events: list[tuple[float, str]] = []
        self.ledger = RunLedger()
        self.idle_mark = 0  # len(events) when wait_idle last returned
        self._session: Session | None = None  # the session of the frame being handled
        if getattr(page, "_das_watcher", None) is None:
            page._das_watcher = self
        page.on("websocket", self._on_ws)

    def _on_ws(self, ws: Any) -> None:
        if "_stcore/stream" not in ws.url:
            return
        session = self.ledger.connect()
        ws.on("framereceived", lambda payload: self._frame(session, self._received, payload))
        ws.on("framesent", lambda payload: self._frame(session, self._sent, payload))

    def _frame(self, session: Session, handle: Any, payload: Any) -> None:
        self._session = session
        try:
            handle(payload)
        finally:
            self._session = None

    def _received(self, payload: Any) -> None:
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        msg = parse_frame(payload, ForwardMsg)
        if msg is None or self._session is None:
            return
        kind = self.ledger.received(self._session, msg)
        if kind is not None:
            self.events.append((time.perf_counter(), kind))

    def _sent(self, payload: Any) -> None:
        from streamlit.proto.BackMsg_pb2 import BackMsg

        msg = parse_frame(payload, BackMsg)
        if msg is None or self._session is None:
            return
        kind = self.ledger.sent(self._session, msg)
        if kind is not None:
            self.events.append((time.perf_counter(), kind))

    @property
    def mark(self) -> int:
        """A bookmark: wait_finished(after=mark) waits for a run that ends after it,
        wait_idle(page, after=mark) for a rerun requested after it to be over."""
        return len(self.events)

    def requested_since(self, mark: int) -> bool:
        return any(kind == "rerun" for _, kind in self.events[mark:])

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

    def busy(self, after: int | None = None) -> str | None:
        """Why the page is not idle now, or None: it has connected, its session has no
        unanswered rerun request and no run going, (with ``after``) a rerun was requested
        after that bookmark, and the status widget shows no running script."""
        # One round trip to the page first: Chromium reports a websocket's creation and frames
        # from the page's own thread as they happen, so after this answer the ledger holds
        # every frame the page sent or received before it.
        stream = self.page.evaluate(STREAM_STATE_JS)
        if stream is not None:
            if not stream["sockets"]:
                return "the page has not opened its connection to the app yet"
            if not stream["open"]:
                return "the page's connection to the app is not open (connecting or reconnecting)"
        # a reconnect of a session that had nothing left to run asks for no run (Streamlit's
        # frontend decides that as it connects, before it shows the app as connected)
        reason = self.ledger.busy(first=stream is None or stream["sockets"] == 1)
        if reason is None and after is not None and not self.requested_since(after):
            reason = "no rerun requested since the bookmark yet"
        if reason is None and is_running(self.page):
            reason = "the status widget shows a running script"  # or not connected
        return reason


def watcher(page: Any) -> RunWatcher:
    """The page's RunWatcher, attached now if it has none (then it sees only what comes next:
    attach it when the page is created)."""
    found = getattr(page, "_das_watcher", None)
    return found if found is not None else RunWatcher(page)


def is_running(page: Any) -> bool:
    return bool(page.locator(RUNNING).count())


def wait_idle(page: Any, timeout: float = 120.0, settle: float = 0.8, start_grace: float = 0.0, *,
              after: int | None = None) -> float:
    """Wait until the app is idle for this page: every rerun the page asked for has been
    answered by a run that has finished (not cut short), none is going, and the status widget
    shows none (``RunWatcher.busy``); the time waited.

    ``after`` (a ``page_watcher.mark`` taken before an action): also wait for the action's rerun
    request, for an action that the test knows asks for one, whenever the page sends it (a file
    upload sends it once the upload is done). ``start_grace`` (without ``after``): first give a
    rerun requested since the previous ``wait_idle`` up to that long to show up; prefer ``after``.
    ``settle`` is not used any more (the old wait's quiet time); it stays for old callers."""
    del settle
    w = watcher(page)
    t0 = time.perf_counter()
    deadline = t0 + timeout
    if after is None and start_grace > 0:
        grace_end = t0 + start_grace
        while not w.requested_since(w.idle_mark) and time.perf_counter() < grace_end:
            page.wait_for_timeout(10)
    while True:
        reason = w.busy(after)
        if reason is None:
            w.idle_mark = w.mark
            return time.perf_counter() - t0
        if time.perf_counter() > deadline:
            raise TimeoutError(f"the app was not idle after {timeout:.0f} s: {reason}")
        page.wait_for_timeout(10)


def pick_checkpoint(page: Any, label: str, timeout: float = 60.0) -> bool:
    """Choose ``label`` (e.g. ``run · digits-das``) in the sidebar's checkpoint picker; False if
    it was chosen already."""
    box = page.locator(SIDEBAR_CHECKPOINT)
    box.wait_for(timeout=timeout * 1000)
    if box.input_value() == label:
        return False
    box.click()
    page.get_by_role("option", name=label, exact=True).click()
    from playwright.sync_api import expect

    expect(box).to_have_value(label, timeout=timeout * 1000)
    return True


def problems(page: Any, allow_errors: tuple[str, ...] = ()) -> list[str]:
    """Tracebacks and error boxes on the page (errors containing one of ``allow_errors`` are
    expected ones)."""
    out = [f"traceback: {t[:500]}" for t in page.locator(EXCEPTION).all_inner_texts()]
    out += [f"error: {t[:300]}" for t in page.locator(ERROR).all_inner_texts()
            if not any(a in t for a in allow_errors)]
    return out


def assert_clean(page: Any, allow_errors: tuple[str, ...] = ()) -> None:
    """No traceback or error box on the page (save ``allow_errors``, see ``problems``) and no
    browser-side error (``page.js_errors``, collected by the ``page`` fixture)."""
    found = problems(page, allow_errors)
    assert not found, found
    assert not page.js_errors, page.js_errors


def open_page(page: Any, server: AppServer, path: str = "", checkpoint: str | None = None,
              timeout: float = 180.0) -> None:
    """Open a page of the app (``path``: ``""`` for Explore, ``"retrieve"``, …), pick
    ``checkpoint`` in the sidebar (interrupting the run on the default demo), wait until idle."""
    page.goto(f"{server.url}/{path}")
    mark = 0
    if checkpoint is not None:
        mark = page.runs.mark
        if not pick_checkpoint(page, checkpoint):
            mark = 0
    page.runs.wait_finished(after=mark, timeout=timeout)
    wait_idle(page, timeout=timeout)


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


# JS: true once the map holds ``n`` produced points whose checksum (``TRACES_JS``'s, summed) is
# no longer ``s``.
PRODUCED_MOVED_JS = """([key, n, s]) => {
  const gd = document.querySelector('.st-key-' + key + ' .js-plotly-plot');
  if (!gd || !gd._fullData) return false;
  let m = 0, t = 0;
  for (const tr of gd._fullData) { if (!String(tr.name).startsWith('produced')) continue;
    for (let i = 0; i < tr.x.length; i++) { const a = +tr.x[i], b = +tr.y[i];
      if (a === a) t += a * 1.000003 + b * 0.999991 * (i % 7 + 1); } m += tr.x.length; }
  return m === n && Math.abs(t - s) > 1e-6;
}"""


def wait_produced_moved(page: Any, before: tuple[int, float], key: str = "explore_map",
                        timeout: float = 60.0) -> None:
    """Wait until the map holds as many produced points as ``before`` (a ``produced_signature``)
    but other ones: new points were produced and drawn (their checksum changed)."""
    page.wait_for_function(PRODUCED_MOVED_JS, arg=[key, before[0], before[1]], timeout=timeout * 1000)


def wait_for_produced(page: Any, key: str = "explore_map", timeout: float = 120.0) -> tuple[int, float]:
    """Wait until a map holds produced points (Explore's produced traces are drawn empty, then
    filled in by app.produced_layer); their signature, as ``produced_signature`` computes it, read
    in the same call that saw them (a graph Streamlit draws anew is empty until it is filled)."""
    handle = page.wait_for_function(
        """(key) => { const r = document.querySelector('.st-key-' + key);
                      const gd = r && r.querySelector('.js-plotly-plot');
                      if (!gd || !gd._fullData || !gd._fullLayout) return null;
                      let n = 0, total = 0;
                      for (const t of gd._fullData) {
                        if (!String(t.name || '').startsWith('produced')) continue;
                        const x = t.x || [], y = t.y || [];
                        let s = 0;
                        for (let i = 0; i < x.length; i++) { const a = +x[i], b = +y[i]; if (a === a) s += a * 1.000003 + b * 0.999991 * (i % 7 + 1); }
                        n += x.length; total += s;
                      }
                      return n > 0 ? [n, total] : null; }""",
        arg=key, timeout=timeout * 1000,
    )
    n, total = handle.json_value()
    return int(n), round(float(total), 6)


# JS: every Plotly graph is drawn for the layout it holds, that layout fits the graph's box (after
# a resize, Streamlit hands Plotly the new width and Plotly redraws), and no transition is going.
PLOTS_DRAWN_JS = """() => [...document.querySelectorAll('.js-plotly-plot')].every(gd => {
  const fl = gd._fullLayout, svg = gd.querySelector('.main-svg');
  if (!fl || !svg || gd._transitioning) return false;
  return +svg.getAttribute('width') === fl.width && +svg.getAttribute('height') === fl.height
         && fl.width <= gd.clientWidth + 1;
})"""
# JS: resolves once the browser has painted the current state (two animation frames: the next
# frame's callbacks run before it is painted, the one after only once it has been)
PAINTED_JS = "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(() => done(true))))"


def wait_painted(page: Any, timeout: float = 30.0) -> None:
    """Wait until every Plotly graph on the page is drawn at its size and the page is painted."""
    page.wait_for_function(PLOTS_DRAWN_JS, polling="raf", timeout=timeout * 1000)
    page.evaluate(PAINTED_JS)


def full_screenshot(page: Any, path: Path, settle: float = 30.0, max_height: int = 12000) -> Path:
    """A screenshot of the whole page: Streamlit scrolls inside ``stMain``, so the viewport is
    made as tall as its content first (and put back afterwards). ``settle``: the longest wait
    for the graphs to be redrawn at that size (``wait_painted``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size or VIEWPORT
    height = page.evaluate(
        """() => { const m = document.querySelector('[data-testid="stMain"]');
                   const s = document.querySelector('[data-testid="stSidebarContent"]');
                   return Math.max(m ? m.scrollHeight : 0, s ? s.scrollHeight : 0, window.innerHeight); }"""
    )
    try:
        page.set_viewport_size({"width": size["width"], "height": min(int(height) + 8, max_height)})
        wait_painted(page, timeout=settle)  # Plotly redraws on resize
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.set_viewport_size(size)
    return path


def failure_shot(page: Any, test_name: str) -> Path | None:
    """A full-page screenshot of a failing test's page in ``tests/artifacts/<test name>.png``
    (what the window shows, if the page's graphs do not settle: it may be why the test failed)."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in test_name)
    path = ARTIFACTS / f"{name}.png"
    try:
        return full_screenshot(page, path, settle=5.0)
    except Exception:  # never hide the test's own failure
        with contextlib.suppress(Exception):
            page.screenshot(path=str(path), full_page=True)
            return path
        return None


def new_tab(browser: Any) -> Any:
    """A new tab (a new Streamlit session) as every browser test uses one: a 60 s default
    timeout, browser-side errors collected in ``page.js_errors``, and ``page.runs``, the run
    watcher ``launch_chromium`` attached as the page was created."""
    p = browser.new_page()
    p.set_default_timeout(60_000)
    p.js_errors = []
    p.runs = watcher(p)
    p.on("pageerror", lambda exc: p.js_errors.append(str(exc)))
    return p


@contextlib.contextmanager
def shot_on_failure(page: Any, test_name: str) -> Iterator[Any]:
    """Run a block on ``page``; if it fails, leave a screenshot (``failure_shot``) before the
    error goes on. The page is closed either way."""
    try:
        yield page
    except BaseException:
        print(f"screenshot of the failing page: {failure_shot(page, test_name)}")
        raise
    finally:
        page.close()
