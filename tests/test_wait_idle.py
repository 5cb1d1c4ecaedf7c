"""``wait_idle``'s bookkeeping (``browser_helpers.RunLedger`` / ``RunWatcher``) on Streamlit's own
messages, without a browser: frames recorded from the real app in Chromium, and a few built
with Streamlit's proto classes for the cases a recording rarely shows.

``tests/data/streamlit_frames.json`` is one session of the app (Streamlit 1.67, recorded with
Playwright's websocket events; every frame the page sent and every lifecycle frame it received,
plus two small deltas): Explore opened, a checkpoint picked while the first run was going,
the Train page (whose jobs panel is a ``run_every=2`` fragment, re-run by the browser's own
timer), an ``epochs`` change sent just after a timer's request, and a reload.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from browser_helpers import RunLedger, RunWatcher, parse_frame, wait_idle, watcher
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

FRAMES = Path(__file__).parent / "data" / "streamlit_frames.json"
JOBS_FRAGMENT = "8357e4e6cc3636ff49c1054a7f835cf7"  # the Train page's jobs panel


def recorded() -> list[dict[str, Any]]:
    return json.loads(FRAMES.read_text())


def frame_bytes(frame: dict[str, Any]) -> bytes:
    return base64.b64decode(frame.get("sent") or frame["recv"])


def replay(frames: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    """Feed the frames to a RunLedger; after each one: (what it was, why busy or None)."""
    ledger = RunLedger()
    sessions: dict[int, Any] = {}
    trace: list[tuple[str, str | None]] = []
    for f in frames:
        if "note" in f:
            continue
        if "open" in f:
            sessions[f["ws"]] = ledger.connect()
            trace.append((f"ws{f['ws']} open", ledger.busy()))
            continue
        if "sent" in f:
            back = parse_frame(frame_bytes(f), BackMsg)
            ledger.sent(sessions[f["ws"]], back)
            what = f"sent {back.WhichOneof('type')} {back.rerun_script.fragment_id[:8]}".strip()
        else:
            fwd = parse_frame(frame_bytes(f), ForwardMsg)
            kind = ledger.received(sessions[f["ws"]], fwd) or fwd.WhichOneof("type")
            what = f"recv {kind} {fwd.metadata.run.script_run_id[:8]}".strip()
        trace.append((f"ws{f['ws']} {what}", ledger.busy()))
    return trace


def test_recorded_session_is_idle_exactly_after_each_last_run_ends() -> None:
    trace = replay(recorded())
    # idle only right after the run that answered every request so far ends (and the status
    # message that follows it), never in between
    idle_after = [what for (what, busy), (prev, _) in zip(trace[1:], trace, strict=False)
                  if busy is None and "status" not in what]
    assert idle_after == [
        "ws0 recv finished:FINISHED_SUCCESSFULLY 827044b9",  # the run with the picked checkpoint
        "ws1 recv finished:FINISHED_SUCCESSFULLY 9b142685",  # Train's first run
        "ws1 recv finished:FINISHED_FRAGMENT_RUN_SUCCESSFULLY 60c2c8ea",  # the timer's fragment run
        "ws1 recv finished:FINISHED_SUCCESSFULLY a8f104e9",  # the epochs change (and a timer's request)
        "ws2 recv finished:FINISHED_SUCCESSFULLY 6dfa4566",  # after the reload
    ]
    busy = dict(trace)  # the last state after each distinct frame description
    # every new websocket is a new session: busy until it has asked for, and had, its first run
    assert busy["ws0 open"] == busy["ws1 open"] == busy["ws2 open"] == "the new session has not asked for its first run yet"


def test_a_run_superseded_by_a_full_rerun_needs_no_end_of_its_own() -> None:
    """The checkpoint was picked while the first run went on: Streamlit stopped that run's
    ScriptRunner and never said it ended; the next run's start answers the pick."""
    trace = replay(recorded())
    whats = [w for w, _ in trace]
    first, second = whats.index("ws0 recv start c59831a2"), whats.index("ws0 recv start 827044b9")
    assert not any("finished" in w and "c59831a2" in w for w in whats)
    pick = whats.index("ws0 sent rerun_script", whats.index("ws0 sent rerun_script") + 1)
    assert first < pick < second
    assert trace[pick][1] == "1 rerun request(s) not started yet (full run)"
    assert trace[second][1] == "run 827044b9 is going"


def test_a_fragment_run_cut_short_keeps_the_page_busy_until_its_successor_ends() -> None:
    trace = replay(recorded())
    whats = [w for w, _ in trace]
    early = whats.index("ws1 recv finished:FINISHED_EARLY_FOR_RERUN 0833a921")
    assert trace[early][1] == f"1 rerun request(s) not started yet (fragment {JOBS_FRAGMENT[:8]})"
    assert trace[early + 2] == ("ws1 recv start 60c2c8ea", "run 60c2c8ea is going")


def test_a_timer_request_and_a_widget_change_are_answered_by_one_full_run() -> None:
    """Coalesced: the fragment's timer request and the full rerun of the epochs change, sent
    29 ms apart, got one full run (no fragment run of their own)."""
    trace = replay(recorded())
    whats = [w for w, _ in trace]
    full = whats.index("ws1 recv start a8f104e9")
    assert trace[full - 1][1] == f"2 rerun request(s) not started yet (fragment {JOBS_FRAGMENT[:8]}, full run)"
    assert trace[full][1] == "run a8f104e9 is going"


def test_an_old_session_does_not_count_once_the_page_reconnects() -> None:
    """The reload came while a timer's fragment run was going on the old websocket (its end
    never came); only the new session counts."""
    trace = replay(recorded())
    assert trace[-1] == ("ws2 recv session_status_changed", None)
    whats = [w for w, _ in trace]
    assert "ws1 recv start 3dabe27d" in whats and not any("3dabe27d" in w and "finished" in w for w in whats)


# -- built frames -----------------------------------------------------------------------------------


def rerun(fragment: str = "") -> Any:
    msg = BackMsg()
    msg.rerun_script.fragment_id = fragment
    msg.rerun_script.is_auto_rerun = bool(fragment)
    return msg


def start(run: str, *fragments: str) -> Any:
    msg = ForwardMsg()
    msg.new_session.name = "app"
    msg.metadata.run.script_run_id = run
    msg.metadata.run.fragment_ids.extend(fragments)
    return msg


def finish(run: str, status: str = "FINISHED_SUCCESSFULLY", *fragments: str) -> Any:
    msg = ForwardMsg()
    msg.script_finished = ForwardMsg.ScriptFinishedStatus.Value(status)
    if run:
        msg.metadata.run.script_run_id = run
        msg.metadata.run.fragment_ids.extend(fragments)
    return msg


def test_a_fragment_run_answers_only_its_own_fragments_requests() -> None:
    ledger = RunLedger()
    s = ledger.connect()
    ledger.sent(s, rerun())
    ledger.received(s, start("a"))
    ledger.received(s, finish("a"))
    assert ledger.busy() is None
    ledger.sent(s, rerun("F"))
    ledger.sent(s, rerun("G"))
    ledger.received(s, start("b", "F"))  # G waits (another fragment)
    ledger.received(s, finish("b", "FINISHED_FRAGMENT_RUN_SUCCESSFULLY", "F"))
    assert ledger.busy() == "1 rerun request(s) not started yet (fragment G)"
    ledger.sent(s, rerun())
    ledger.received(s, start("c", "G"))  # a fragment run never answers a full rerun
    assert ledger.busy() == "1 rerun request(s) not started yet (full run)"
    ledger.received(s, start("d"))
    ledger.received(s, finish("d"))
    assert ledger.busy() is None


def test_a_full_run_answers_a_fragment_request_that_streamlit_dropped() -> None:
    """A request for a fragment that a full run removed starts nothing on the server; the full
    run's start, after the request, answers it."""
    ledger = RunLedger()
    s = ledger.connect()
    ledger.sent(s, rerun("F"))
    ledger.sent(s, rerun())
    ledger.received(s, start("a"))
    assert ledger.busy() == "run a is going"
    ledger.received(s, finish("a"))
    assert ledger.busy() is None


def test_only_the_latest_runs_end_counts() -> None:
    ledger = RunLedger()
    s = ledger.connect()
    ledger.sent(s, rerun())
    ledger.received(s, start("old"))
    ledger.sent(s, rerun())
    ledger.received(s, start("new"))
    ledger.received(s, finish("old"))  # a stale end (an older run) changes nothing
    assert ledger.busy() == "run new is going"
    ledger.received(s, finish("", "FINISHED_SUCCESSFULLY"))  # no run id: ends the run in progress
    assert ledger.busy() is None
    ledger.sent(s, rerun())
    ledger.received(s, start("next"))
    ledger.received(s, finish("next", "FINISHED_EARLY_FOR_RERUN"))
    assert ledger.busy() == "run next ended early for a rerun that has not started yet"


def test_a_reconnect_needs_no_run_but_a_new_session_does() -> None:
    ledger = RunLedger()
    assert ledger.busy() == "the page has no connection to the app yet"
    ledger.connect()
    assert ledger.busy(first=True) == "the new session has not asked for its first run yet"
    assert ledger.busy(first=False) is None  # Streamlit's frontend asks for no run on a quiet reconnect


def test_frames_that_are_not_streamlit_messages_are_ignored() -> None:
    assert parse_frame("text frame", ForwardMsg) is None
    assert parse_frame(b"\xff\xff\xff not a protobuf", ForwardMsg) is None
    ok = parse_frame(finish("a").SerializeToString(), ForwardMsg)
    assert ok is not None and ok.WhichOneof("type") == "script_finished"


# -- wait_idle on a fake page that plays recorded frames as Playwright would deliver them ------------


class FakeWebSocket:
    url = "ws://127.0.0.1:1/_stcore/stream"

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def on(self, event: str, handler: Any) -> None:
        self.handlers[event] = handler


class FakeLocator:
    def count(self) -> int:
        return 0  # the status widget: never shown here


class FakePage:
    """Delivers one recorded frame per Playwright call (as events arrive while Playwright is
    called); ``wait_for_timeout`` advances nothing else."""

    def __init__(self, frames: list[dict[str, Any]]) -> None:
        self.frames = [f for f in frames if "note" not in f]
        self.handlers: dict[str, Any] = {}
        self.registered: list[str] = []
        self.sockets: dict[int, FakeWebSocket] = {}
        self.calls = 0

    def on(self, event: str, handler: Any) -> None:
        self.handlers[event] = handler
        self.registered.append(event)

    def _deliver(self) -> None:
        self.calls += 1
        if not self.frames:
            return
        f = self.frames.pop(0)
        if "open" in f:
            self.sockets[f["ws"]] = ws = FakeWebSocket()
            self.handlers["websocket"](ws)
        elif "sent" in f:
            self.sockets[f["ws"]].handlers["framesent"](frame_bytes(f))
        else:
            self.sockets[f["ws"]].handlers["framereceived"](frame_bytes(f))

    def evaluate(self, js: str) -> Any:
        self._deliver()
        return {"sockets": 1 if self.sockets else 0, "open": bool(self.sockets)}

    def locator(self, selector: str) -> FakeLocator:
        return FakeLocator()

    def wait_for_timeout(self, ms: float) -> None:
        self._deliver()


def test_wait_idle_returns_when_the_last_request_has_been_answered() -> None:
    page = FakePage([f for f in recorded() if f.get("ws") == 0])
    w = RunWatcher(page)
    wait_idle(page, timeout=30)
    assert [k for _, k in w.events] == ["rerun", "start", "rerun", "start", "finished:FINISHED_SUCCESSFULLY"]
    left = [f for f in page.frames if "recv" in f]
    assert len(left) == 1  # only the status message after the end was still to come


def test_wait_idle_after_a_mark_waits_for_the_actions_request() -> None:
    """Idle already, but the action's request is still to be sent (a file upload sends it once
    the upload is done): with ``after`` the wait goes on until that request's run has ended."""
    page = FakePage([f for f in recorded() if f.get("ws") == 1])  # the Train page's session
    w = RunWatcher(page)
    wait_idle(page, timeout=30)
    mark = w.mark
    assert w.events[-1][1] == "finished:FINISHED_SUCCESSFULLY"
    wait_idle(page, timeout=30, after=mark)
    assert [k for _, k in w.events[mark:]][:2] == ["rerun", "start"]
    assert w.events[-1][1] == "finished:FINISHED_FRAGMENT_RUN_SUCCESSFULLY"


def test_wait_idle_names_what_it_waited_for_when_it_times_out() -> None:
    frames = [f for f in recorded() if f.get("ws") == 0][:3]  # open, request, start: the run never ends
    page = FakePage(frames)
    RunWatcher(page)
    with pytest.raises(TimeoutError, match="run c59831a2 is going"):
        wait_idle(page, timeout=0.2)


def test_a_page_has_one_watcher() -> None:
    """``RunWatcher(page)`` (the old way to attach one) returns the one attached at creation,
    so its bookmarks are those ``wait_idle`` reads."""
    page = FakePage([])
    first = RunWatcher(page)
    assert RunWatcher(page) is first and watcher(page) is first
    assert page.registered == ["websocket"]  # one listener
