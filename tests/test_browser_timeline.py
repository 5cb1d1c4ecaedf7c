"""The training timeline in the real app, in headless Chromium (issue 13, item 5): the Timeline
page plays a baseline run and a DAS run side by side, one animation frame per stored epoch
(epoch 0 = before training); the slider steps to an epoch and the play button plays the epochs
in order; hovering a point shows its probe image's thumbnail (app/hover.py) at every epoch.

One app server for the module whose runs root holds two 3-epoch digits runs (made by the CLI in
a fixture, with a 300-image probe)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from browser_helpers import (
    AppServer,
    assert_clean,
    skip_without_chromium,
    wait_idle,
)

from conftest import QUICK_DIGITS

skip_without_chromium()

from playwright.sync_api import expect  # noqa: E402 (after the skip: playwright may be missing)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

EPOCHS = 3
CHART = ".st-key-timeline_chart .js-plotly-plot"


@pytest.fixture(scope="module")
def app_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``runs/digits-base`` and ``runs/digits-das``: 3 epochs each, the same 300 probe images."""
    from das_core.cli import main

    root = tmp_path_factory.mktemp("browser-timeline")
    for name, extra in (("digits-base", []), ("digits-das", ["--das"])):
        args = ["train", *QUICK_DIGITS, "--epochs", str(EPOCHS), "--timeline-probe", "300",
                "--out", str(root / "runs" / name), *extra]
        assert main(args) == 0
    (root / "cache").mkdir()
    return root


# JS: the chart's state: frame names, the slider's active step, and whether every trace shows
# the data of frame ``k`` (the frames hold every trace, in order).
STATE = """(k) => {
  const gd = document.querySelector('CHART');
  if (!gd || !gd._transitionData || !gd.layout.sliders) return null;
  const frames = gd._transitionData._frames || [];
  // a frame's arrays may still be Plotly's base64 form {dtype, bdata} (decoded when shown)
  const arr = (x) => {
    if (!x || !x.bdata) return Array.from(x || []);
    const bin = atob(x.bdata), bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const T = {f4: Float32Array, f8: Float64Array, i4: Int32Array, i2: Int16Array, i1: Int8Array}[x.dtype];
    return Array.from(new T(bytes.buffer));
  };
  const shows = (i) => i >= 0 && i < frames.length && frames[i].data.every((t, j) => {
    const want = arr(t.x), got = gd.data[j] ? arr(gd.data[j].x) : [];
    return want.length === got.length && want.every((v, n) => v === got[n]);
  });
  return {frames: frames.map(f => f.name), active: gd.layout.sliders[0].active, traces: gd.data.length,
          shows: shows(k), titles: (gd.layout.annotations || []).map(a => a.text)};
}""".replace("CHART", CHART)

# JS: once the chart has frame ``k`` on the slider and in every trace.
AT_FRAME = STATE.replace("return {", "const ok = gd.layout.sliders[0].active === k && shows(k); return ok && {")


# JS: the most isolated point of the chart now (farthest, on screen, from any other point of its
# panel), reachable by the mouse, with its screen position (from its panel's Plotly axes), its
# trace (class) and customdata[0] (the probe image's index in the test split).
ISOLATED_POINT = """() => {
  const gd = document.querySelector('CHART');
  gd.scrollIntoView({block: 'center', behavior: 'instant'});  // the mouse only reaches the window
  const fl = gd._fullLayout, box = gd.getBoundingClientRect();
  const pts = [];
  gd._fullData.forEach(t => {
    if (t.mode !== 'markers') return;
    const xa = fl[t.xaxis.replace('x', 'xaxis')], ya = fl[t.yaxis.replace('y', 'yaxis')];
    for (let i = 0; i < t.x.length; i++) {
      const px = box.left + xa._offset + xa.l2p(+t.x[i]), py = box.top + ya._offset + ya.l2p(+t.y[i]);
      const inside = px > box.left + xa._offset + 10 && px < box.left + xa._offset + xa._length - 10 &&
                     py > box.top + ya._offset + 10 && py < box.top + ya._offset + ya._length - 10;
      pts.push({px, py, inside, panel: t.xaxis, id: +t.customdata[i][0], trace: t.name});
    }
  });
  // not under the modebar (shown in a corner while the mouse is over the chart) nor the legend
  const bar = gd.querySelector('.modebar'), mb = bar ? bar.getBoundingClientRect() : null;
  const reachable = (p) => {
    if (!p.inside || p.px > window.innerWidth - 1 || p.py > window.innerHeight - 1) return false;
    if (mb && p.px > mb.left - 10 && p.px < mb.right + 10 && p.py > mb.top - 10 && p.py < mb.bottom + 10) return false;
    const el = document.elementFromPoint(p.px, p.py);
    return !!el && gd.contains(el) && el.classList.contains('nsewdrag');
  };
  let best = null, bestD = -1;
  for (const p of pts) {
    if (!reachable(p)) continue;
    let d = Infinity;
    for (const q of pts) { if (q !== p && q.panel === p.panel) d = Math.min(d, Math.hypot(p.px - q.px, p.py - q.py)); }
    if (d > bestD) { bestD = d; best = p; }
  }
  return best && {...best, gap: bestD};
}""".replace("CHART", CHART)


def hover_point(page: Any, probe: tuple[list[int], list[str]]) -> str:
    """Hover the most isolated point of the chart; the tooltip must show that point: its class
    and its index in the test split ("<class> · #<index>"), an index the run stored as a probe
    image of that class. Returns the tooltip's text."""
    pt = page.evaluate(ISOLATED_POINT)
    assert pt is not None and pt["gap"] > 3, pt
    indices, classes = probe
    assert pt["id"] in indices and classes[indices.index(pt["id"])] == pt["trace"], pt
    tip = page.locator("#das-thumb-tip")
    page.mouse.move(pt["px"] - 30, pt["py"] - 30)
    page.mouse.move(pt["px"], pt["py"], steps=5)  # on the way it may pass other points: wait for this one
    expect(tip.locator(".text")).to_have_text(f"{pt['trace']} · #{pt['id']}", timeout=15_000)
    expect(tip).to_be_visible()
    bg = page.evaluate("() => getComputedStyle(document.querySelector('#das-thumb-tip .thumb')).backgroundImage")
    assert re.search(r'url\("?[^")]*/app/static/cache/[^")]+\.png"?\)', bg), bg
    text = str(tip.locator(".text").inner_text())
    page.mouse.move(5, 5)  # off the chart: the tooltip goes
    expect(tip).to_be_hidden(timeout=10_000)
    return text


def test_timeline_plays_one_frame_per_epoch_side_by_side(page: Any, server: AppServer, app_root: Path) -> None:
    page.goto(f"{server.url}/timeline")
    page.locator(CHART).wait_for(timeout=240_000)  # one UMAP map per epoch and run, then the chart
    wait_idle(page, timeout=240)
    state = page.evaluate(STATE, 0)
    # one frame per stored epoch, epoch 0 (before training) first
    assert state["frames"] == [str(e) for e in range(EPOCHS + 1)], state
    assert state["active"] == 0 and state["shows"], state
    assert state["traces"] == 2 * 5  # 5 test classes, in each of the two panels
    assert any("digits-base" in t for t in state["titles"]) and any("digits-das" in t for t in state["titles"])

    # hover: the point's thumbnail, cut out of the test split's sprite sheet (served by the
    # static file server), named by its class and its index in the split, as the run stored it
    from das_core.store.timeline import load_timeline

    stored = load_timeline(app_root / "runs" / "digits-base")
    assert len(stored.indices) == 300 and stored.meta["split_size"] > 300  # a subset: index != position
    probe = (stored.indices.tolist(), [stored.class_names[c] for c in stored.labels])
    with page.expect_response(lambda r: "/app/static/cache/" in r.url, timeout=30_000) as sheet:
        hover_point(page, probe)
    assert sheet.value.status == 200 and sheet.value.headers.get("content-type", "").startswith("image/")

    # step: a click on the slider at epoch 2's label moves the slider and the points to epoch 2
    chart = page.locator(CHART)
    chart.scroll_into_view_if_needed()
    label = chart.locator("g.slider-label-group").nth(2).bounding_box()
    rail = chart.locator("rect.slider-rail-touch-rect").bounding_box()
    assert label is not None and rail is not None
    page.mouse.click(label["x"] + label["width"] / 2, rail["y"] + rail["height"] / 2)
    page.wait_for_function(AT_FRAME, arg=2, timeout=30_000)
    hover_point(page, probe)  # the frame replaced the points: they still carry their indices

    # play: back to epoch 0, then ▶ Play goes through the epochs in order and stops at the last
    chart.scroll_into_view_if_needed()
    rail = chart.locator("rect.slider-rail-touch-rect").bounding_box()  # again: the hover may have scrolled
    page.mouse.click(chart.locator("g.slider-label-group").nth(0).bounding_box()["x"] + 2, rail["y"] + rail["height"] / 2)
    page.wait_for_function(AT_FRAME, arg=0, timeout=30_000)
    page.evaluate("""() => { const gd = document.querySelector('CHART'); window.__played = [];
        gd.on('plotly_animatingframe', (e) => window.__played.push(e.name)); }""".replace("CHART", CHART))
    chart.locator("g.updatemenu-button").filter(has_text="Play").click()
    page.wait_for_function(AT_FRAME, arg=EPOCHS, timeout=60_000)
    played = page.evaluate("() => window.__played")
    assert played[-EPOCHS:] == [str(e) for e in range(1, EPOCHS + 1)], played
    hover_point(page, probe)  # and after playing
    assert_clean(page)
