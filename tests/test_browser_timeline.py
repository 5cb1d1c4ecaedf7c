"""The training timeline in the real app, in headless Chromium (issue 13, item 5): the Timeline
page plays a baseline run and a DAS run side by side, one animation frame per stored epoch
(epoch 0 = before training); the slider steps to an epoch and the play button plays the epochs
in order.

One app server for the module whose runs root holds two 3-epoch digits runs (made by the CLI in
a fixture, with a 300-image probe)."""

from __future__ import annotations

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


def test_timeline_plays_one_frame_per_epoch_side_by_side(page: Any, server: AppServer) -> None:
    page.goto(f"{server.url}/timeline")
    page.locator(CHART).wait_for(timeout=240_000)  # one UMAP map per epoch and run, then the chart
    wait_idle(page, timeout=240)
    state = page.evaluate(STATE, 0)
    # one frame per stored epoch, epoch 0 (before training) first
    assert state["frames"] == [str(e) for e in range(EPOCHS + 1)], state
    assert state["active"] == 0 and state["shows"], state
    assert state["traces"] == 2 * 5  # 5 test classes, in each of the two panels
    assert any("digits-base" in t for t in state["titles"]) and any("digits-das" in t for t in state["titles"])

    # step: a click on the slider at epoch 2's label moves the slider and the points to epoch 2
    chart = page.locator(CHART)
    chart.scroll_into_view_if_needed()
    label = chart.locator("g.slider-label-group").nth(2).bounding_box()
    rail = chart.locator("rect.slider-rail-touch-rect").bounding_box()
    assert label is not None and rail is not None
    page.mouse.click(label["x"] + label["width"] / 2, rail["y"] + rail["height"] / 2)
    page.wait_for_function(AT_FRAME, arg=2, timeout=30_000)

    # play: back to epoch 0, then ▶ Play goes through the epochs in order and stops at the last
    page.mouse.click(chart.locator("g.slider-label-group").nth(0).bounding_box()["x"] + 2, rail["y"] + rail["height"] / 2)
    page.wait_for_function(AT_FRAME, arg=0, timeout=30_000)
    page.evaluate("""() => { const gd = document.querySelector('CHART'); window.__played = [];
        gd.on('plotly_animatingframe', (e) => window.__played.push(e.name)); }""".replace("CHART", CHART))
    chart.locator("g.updatemenu-button").filter(has_text="Play").click()
    page.wait_for_function(AT_FRAME, arg=EPOCHS, timeout=60_000)
    played = page.evaluate("() => window.__played")
    assert played[-EPOCHS:] == [str(e) for e in range(1, EPOCHS + 1)], played
    assert_clean(page)
