"""A slider move on the Explore page sends only what changed (issue 13, item 6), measured on
the wire: the bytes of the websocket frames the server sends for the first draw of the map in a
new browser session, and for one r_s move, on the embedded Fashion-MNIST demo (its training
split: 31,500 real points, the size the issue is about; the digits run's 720 points are too few
for the comparison to mean anything). The move must cost at most 10 % of the first draw. And
a new figure (links turned off) gets the produced points that were not sent again.

One app server with an empty cache: a first tab computes the demo's embeddings, map and
thumbnails (cold, a minute or two on one thread); the measured tab is a second session on the
same server (a person opening the app again), whose first draw comes from the caches.
``DAS_SLIDER_RESULT=path.json`` also writes the numbers (bytes and seconds) there
(``bench/results/app_slider.json`` feeds the README's speed table, ``bench/summarise.py``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from browser_helpers import (
    AppServer,
    RunWatcher,
    assert_clean,
    new_tab,
    parse_frame,
    produced_signature,
    shot_on_failure,
    skip_without_chromium,
    traces,
    wait_for_produced,
    wait_idle,
    wait_produced_moved,
)

skip_without_chromium()

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# the demo's map is cold in the first tab: embedding 31,500 images and fitting UMAP on one thread
COLD_TIMEOUT = 900.0
TARGET_RATIO = 0.10  # issue 13, item 6: a move sends at most 10 % of the first draw's bytes
MOVES = 3


def _demo_missing() -> str | None:
    from das_core.data.fashion_mnist import locate_fashion_mnist
    from das_core.store.demo import demo_checkpoint

    if not demo_checkpoint().is_file():
        return f"{demo_checkpoint()} is missing (make demo-model)"
    if locate_fashion_mnist() is None:
        return "Fashion-MNIST is not installed (make data)"
    return None


class FrameBytes(RunWatcher):
    """RunWatcher, plus the size of every websocket frame the server sends, stamped, with what
    it carries (an element's type, ``ref_hash`` for a message the browser holds already, or the
    message's type)."""

    def __init__(self, page: Any) -> None:
        self.frames: list[tuple[float, int, str]] = []
        super().__init__(page)

    def _received(self, payload: Any) -> None:
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        msg = parse_frame(payload, ForwardMsg)
        kind = "?" if msg is None else str(msg.WhichOneof("type"))
        if msg is not None and kind == "delta" and msg.delta.WhichOneof("type") == "new_element":
            kind = str(msg.delta.new_element.WhichOneof("type"))
        self.frames.append((time.perf_counter(), len(payload), kind))
        super()._received(payload)

    def bytes_since(self, t0: float) -> int:
        return sum(n for t, n, _ in self.frames if t >= t0)

    def by_kind_since(self, t0: float) -> dict[str, int]:
        out: dict[str, int] = {}
        for t, n, kind in self.frames:
            if t >= t0:
                out[kind] = out.get(kind, 0) + n
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@pytest.fixture(scope="module")
def app_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No runs and an empty cache: the app opens on the demo (its default checkpoint)."""
    why = _demo_missing()
    if why:
        pytest.skip(why)
    return tmp_path_factory.mktemp("slider-app")


def _open_map(ctx: Any, server: AppServer, timeout: float) -> tuple[Any, FrameBytes, float]:
    """A new tab on Explore (the demo is the default checkpoint): the page, its frame counter,
    and the seconds from ``goto`` to the map holding its produced points with no script running."""
    page = new_tab(ctx)
    frames = FrameBytes(page)
    t0 = time.perf_counter()
    page.goto(server.url + "/")
    wait_for_produced(page, timeout=timeout)
    wait_idle(page, timeout=timeout)
    return page, frames, time.perf_counter() - t0


def test_explore_slider_move_sends_at_most_a_tenth_of_the_first_draw(browser: Any, server: AppServer,
                                                               request: pytest.FixtureRequest) -> None:
    warm, _, cold_s = _open_map(browser, server, COLD_TIMEOUT)  # computes and caches the demo's map
    warm.close()

    page, frames, map_s = _open_map(browser, server, 120)
    with shot_on_failure(page, request.node.name):
        assert_clean(page)
        first_draw = frames.bytes_since(0.0)
        first_by_kind = frames.by_kind_since(0.0)
        thumb = page.locator('.st-key-r_s input[type="range"]')
        moves: list[dict[str, Any]] = []
        for _ in range(MOVES):
            before = produced_signature(page)
            assert before is not None
            thumb.focus()
            t0 = time.perf_counter()
            page.keyboard.press("ArrowRight")  # a new r_s: new produced points
            wait_produced_moved(page, before)
            t_drawn = time.perf_counter()
            wait_idle(page)
            moves.append({"bytes": frames.bytes_since(t0), "drawn_s": t_drawn - t0, "by_kind": frames.by_kind_since(t0)})
        result = {"first_draw_bytes": first_draw, "first_draw_by_kind": first_by_kind, "first_map_s": map_s, "cold_map_s": cold_s, "moves": moves,
                  "max_move_bytes": max(m["bytes"] for m in moves),
                  "median_move_s": sorted(m["drawn_s"] for m in moves)[len(moves) // 2]}
        result["ratio"] = result["max_move_bytes"] / first_draw
        result["machine"] = {"cores": os.cpu_count(), "load_average": list(os.getloadavg()),
                             "date": time.strftime("%Y-%m-%d %H:%M"), "server_threads": 1}
        print(json.dumps(result))
        out = os.environ.get("DAS_SLIDER_RESULT")
        if out:
            Path(out).write_text(json.dumps(result, indent=1))
        assert first_draw > 500_000, result  # 31,500 real points are on the wire at least once
        assert result["ratio"] <= TARGET_RATIO, result
        assert_clean(page)


# JS: how many produced points a map has, and how many of their links do not run from the real
# point of their anchor id to them.
LINKS_JS = """(key) => {
  const gd = document.querySelector('.st-key-' + key + ' .js-plotly-plot'), fd = gd._fullData;
  const real = new Map();
  for (const t of fd) {
    if (String(t.name).startsWith('produced') || t.mode !== 'markers') continue;
    for (let k = 0; k < t.x.length; k++) real.set(+t.customdata[k][0], [+t.x[k], +t.y[k]]);
  }
  const links = fd.find(t => t.name === 'anchor → produced');
  let j = 0, bad = 0;
  for (const t of fd.filter(t => String(t.name).startsWith('produced'))) {
    for (let k = 0; k < t.x.length; k++, j++) {
      const a = real.get(+t.customdata[k][0]);
      if (!a || +links.x[3 * j] !== a[0] || +links.y[3 * j] !== a[1] || +links.x[3 * j + 1] !== +t.x[k]
          || +links.y[3 * j + 1] !== +t.y[k] || +links.x[3 * j + 2] === +links.x[3 * j + 2]) bad++;
    }
  }
  return {n: j, bad, links: links.x.length};
}"""


def test_explore_a_new_figure_gets_the_produced_points_again(browser: Any, server: AppServer,
                                                             request: pytest.FixtureRequest) -> None:
    """Turning the links off draws a new figure (no links trace): the produced points, which did
    not change and so are not sent again, are written into the new graph too."""
    page, _, _ = _open_map(browser, server, COLD_TIMEOUT)
    with shot_on_failure(page, request.node.name):
        before = produced_signature(page)
        assert before is not None
        assert any(t["name"] == "anchor → produced" and t["n"] == 3 * before[0] for t in traces(page, "explore_map"))
        # each link runs from its anchor (the real point whose customdata is the produced
        # point's anchor id; the browser looks it up) to the produced point: exact copies
        links = page.evaluate(LINKS_JS, "explore_map")
        assert links["n"] == before[0] and links["bad"] == 0, links
        page.locator(".st-key-links label").first.click()  # the label takes the click, not the hidden input
        page.wait_for_function(
            """([n, s]) => { const gd = document.querySelector('.st-key-explore_map .js-plotly-plot');
                if (!gd || !gd._fullData || gd._fullData.some(t => t.name === 'anchor → produced')) return false;
                let m = 0, t = 0;
                for (const tr of gd._fullData) { if (!String(tr.name).startsWith('produced')) continue;
                  for (let i = 0; i < tr.x.length; i++) { const a = +tr.x[i], b = +tr.y[i];
                    if (a === a) t += a * 1.000003 + b * 0.999991 * (i % 7 + 1); } m += tr.x.length; }
                return m === n && Math.abs(t - s) < 1e-6 * Math.max(1, Math.abs(s)); }""",
            arg=[before[0], before[1]], timeout=60_000,
        )
        wait_idle(page)
        assert produced_signature(page) == before
        assert_clean(page)


# JS: count the browser's Plotly.restyle calls on the page (app.produced_layer is their only caller)
COUNT_RESTYLES_JS = """() => { const P = window.Plotly;
  if (!P.__dasCount) { const o = P.restyle; P.__dasCount = {n: 0}; P.restyle = function(...a) { P.__dasCount.n++; return o.apply(this, a); }; }
  return P.__dasCount.n; }"""
# JS: redraw the map as it is (Plotly.react on its own data) and resolve once everything that
# its plotly_afterplot listeners queued has run (an afterplot listener that finds the map not
# holding its points queues its restyle with setTimeout 0; two more turns of the task queue
# come after it): the restyles counted since then, and the produced points' checksum
REDRAW_AND_SETTLE_JS = """(key) => new Promise(done => {
  const gd = document.querySelector('.st-key-' + key + ' .js-plotly-plot'), P = window.Plotly;
  const n0 = P.__dasCount.n;
  gd.once('plotly_afterplot', () => setTimeout(() => setTimeout(() => setTimeout(() => done(P.__dasCount.n - n0), 0), 0), 0));
  P.react(gd, gd.data, gd.layout);
})"""


def test_explore_slider_moves_leave_one_writer_of_the_produced_points(browser: Any, server: AppServer,
                                                                     request: pytest.FixtureRequest) -> None:
    """Streamlit runs the produced layer's JavaScript anew for every payload without stopping the
    previous run: only the newest may write into the map. Two writers would put their points
    back and forth for ever (the map showing an old r_s's points half of the time): after two
    moves, a redraw of the map that keeps its data must restyle nothing and leave the points
    as they are, and each move costs one restyle."""
    page, _, _ = _open_map(browser, server, COLD_TIMEOUT)
    with shot_on_failure(page, request.node.name):
        thumb = page.locator('.st-key-r_s input[type="range"]')
        counts = []
        for _ in range(2):
            before = produced_signature(page)
            assert before is not None
            n0 = page.evaluate(COUNT_RESTYLES_JS)
            thumb.focus()
            page.keyboard.press("ArrowRight")
            wait_produced_moved(page, before)
            wait_idle(page)
            counts.append(page.evaluate(COUNT_RESTYLES_JS) - n0)
        settled = produced_signature(page)
        assert page.evaluate(REDRAW_AND_SETTLE_JS, "explore_map") == 0, "a redraw that kept the points restyled them"
        assert produced_signature(page) == settled
        assert counts == [1, 1], counts  # one restyle per move: the newest payload's, once
        assert_clean(page)
