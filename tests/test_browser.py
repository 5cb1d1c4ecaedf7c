"""Every page of the real app in headless Chromium: the map, its hover thumbnails, a slider
move and a box selection on Explore; DAS internals' plots; a query upload (and a broken one) on
Retrieve; a training job started and cancelled on Train; the runs table on Compare.

One app server for the module (``streamlit run`` on a free port) whose runs root holds a copy
of the small digits run, and one Chromium; each test opens its own tab (its own Streamlit
session). A failing test leaves a full-page screenshot in ``tests/artifacts/<test>.png``.

With ``DAS_UPDATE_SCREENSHOTS=1`` (``make screenshots``), the ``test_readme_screenshot`` tests
also save one screenshot per page, on the demo checkpoint, to ``assets/screenshots/<page>.png``
(cold: the demo's embeddings and maps are computed first, a few minutes).
"""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from browser_helpers import (
    ERROR,
    EXCEPTION,
    REPO,
    AppServer,
    assert_clean,
    full_screenshot,
    open_page,
    produced_signature,
    skip_without_chromium,
    traces,
    wait_for_produced,
    wait_idle,
    wait_painted,
    wait_produced_moved,
)

from app_helpers import install_run

skip_without_chromium()

from playwright.sync_api import expect  # noqa: E402 (after the skip: playwright may be missing)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

RUN_LABEL = "run · digits-das"
DEMO_LABEL = "demo · fashion-mnist-das"
SCREENSHOTS = REPO / "assets" / "screenshots"
UPDATE_SCREENSHOTS = os.environ.get("DAS_UPDATE_SCREENSHOTS") == "1"


# -- fixtures (server, browser and page: browser_fixtures.py) -------------------------------------


@pytest.fixture(scope="module")
def app_root(digits_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh folder with ``runs/`` (a copy of the digits run) and an empty ``cache/``."""
    root = tmp_path_factory.mktemp("browser-app")
    install_run(digits_run, root / "runs", name="digits-das")
    (root / "cache").mkdir()
    return root


# -- Explore --------------------------------------------------------------------------------------

# JS: the most isolated real (or produced) point of a map (farthest, on screen, from any other
# point), with its screen position and its index in the split (customdata[0]: a produced
# point's is its anchor's).
ISOLATED_POINT = """([key, wantReal]) => {
  const gd = document.querySelector('.st-key-' + key + ' .js-plotly-plot');
  gd.scrollIntoView({block: 'center', behavior: 'instant'});  // the mouse only reaches the window
  const fl = gd._fullLayout, xa = fl.xaxis, ya = fl.yaxis, box = gd.getBoundingClientRect();
  const pts = [];
  gd._fullData.forEach((t, ti) => {
    if (t.mode !== 'markers') return;
    const real = !String(t.name).startsWith('produced');
    for (let i = 0; i < t.x.length; i++) {
      const px = box.left + xa._offset + xa.l2p(+t.x[i]), py = box.top + ya._offset + ya.l2p(+t.y[i]);
      pts.push({px, py, real, id: +t.customdata[i][0], trace: t.name, text: t.text ? String(t.text[i]) : null});
    }
  });
  // A point the mouse can reach: inside the plot area, inside the window, and with the plot's
  // own drag layer on top (not under the modebar, which shows in a corner of the plot while
  // the mouse is over it, nor the legend). Which point is the most isolated depends on the
  // trained run, so on another machine it can sit in such a corner.
  const bar = gd.querySelector('.modebar');
  const mb = bar ? bar.getBoundingClientRect() : null;
  const reachable = (p) => {
    if (p.px < 0 || p.py < 0 || p.px > window.innerWidth - 1 || p.py > window.innerHeight - 1) return false;
    if (mb && p.px > mb.left - 10 && p.px < mb.right + 10 && p.py > mb.top - 10 && p.py < mb.bottom + 10) return false;
    const el = document.elementFromPoint(p.px, p.py);
    return !!el && gd.contains(el) && el.classList.contains('nsewdrag');
  };
  let best = null, bestD = -1;
  for (const p of pts) {
    if (p.real !== wantReal) continue;
    if (p.px < box.left + xa._offset + 10 || p.px > box.left + xa._offset + xa._length - 10) continue;
    if (p.py < box.top + ya._offset + 10 || p.py > box.top + ya._offset + ya._length - 10) continue;
    if (!reachable(p)) continue;
    let d = Infinity;
    for (const q of pts) { if (q !== p) d = Math.min(d, Math.hypot(p.px - q.px, p.py - q.py)); }
    if (d > bestD) { bestD = d; best = p; }
  }
  return {...best, key, gap: bestD,
          plot: {left: box.left + xa._offset, top: box.top + ya._offset, width: xa._length, height: ya._length}};
}"""

# JS: where the point ``id`` of trace ``name`` is on the screen now (scrolled into view).
POINT_NOW = """([key, name, id]) => {
  const gd = document.querySelector('.st-key-' + key + ' .js-plotly-plot');
  if (!gd || !gd._fullData) return null;
  gd.scrollIntoView({block: 'center', behavior: 'instant'});
  const fl = gd._fullLayout, xa = fl.xaxis, ya = fl.yaxis, box = gd.getBoundingClientRect();
  for (const t of gd._fullData) {
    if (t.name !== name || t.mode !== 'markers') continue;
    for (let i = 0; i < t.x.length; i++) {
      if (+t.customdata[i][0] !== id) continue;
      return {px: box.left + xa._offset + xa.l2p(+t.x[i]), py: box.top + ya._offset + ya.l2p(+t.y[i])};
    }
  }
  return null;
}"""

# JS: a rectangle around the densest spot of real points (for the box selection).
DENSE_BOX = """(key) => {
  const gd = document.querySelector('.st-key-' + key + ' .js-plotly-plot');
  const fl = gd._fullLayout, xa = fl.xaxis, ya = fl.yaxis, box = gd.getBoundingClientRect();
  const pts = [];
  gd._fullData.forEach(t => {
    if (t.mode !== 'markers' || String(t.name).startsWith('produced')) return;
    for (let i = 0; i < t.x.length; i++)
      pts.push([box.left + xa._offset + xa.l2p(+t.x[i]), box.top + ya._offset + ya.l2p(+t.y[i])]);
  });
  const R = 30;
  let best = pts[0], bestN = -1;
  for (const p of pts) {
    let n = 0;
    for (const q of pts) if (Math.abs(p[0] - q[0]) < R && Math.abs(p[1] - q[1]) < R) n++;
    if (n > bestN) { bestN = n; best = p; }
  }
  return {x0: best[0] - R, y0: best[1] - R, x1: best[0] + R, y1: best[1] + R, n: bestN};
}"""


def open_explore(page: Any, server: AppServer) -> tuple[int, float]:
    """Explore on the digits run, its map drawn: (number of produced points, their checksum)."""
    open_page(page, server, "", checkpoint=RUN_LABEL)
    before = wait_for_produced(page)
    assert before[0] == 5 * 50 * 3, before  # 5 classes x 50 anchors x T=3 rounds on the digits run
    # the run goes on after the map (gap fill, honesty, export buttons below it): let it finish,
    # so that the page no longer moves under a point the test aims at
    wait_idle(page)
    real = [t for t in traces(page, "explore_map") or [] if t["mode"] == "markers" and not t["name"].startswith("produced")]
    assert len(real) == 5 and sum(t["n"] for t in real) > 500
    assert_clean(page)
    return before


def hover(page: Any, pt: dict[str, Any]) -> Any:
    """Move the mouse onto a point of a map (from a little way off); the tooltip, once it shows
    that point (on the way, the mouse may pass other points, whose tooltips show first: a
    produced point's anchor, named "#<id>" too, often lies on the way)."""
    tip = page.locator("#das-thumb-tip")
    # app/hover.py's label: "<name> · #<id>" for a real point, "<name> · round <r> · anchor #<id>"
    # for a produced one
    label = rf"^(.+ · )?#{pt['id']}$" if pt["real"] else rf"^(.+ · )?round \d+ · anchor #{pt['id']}$"
    at = pt
    for attempt in range(3):
        page.mouse.move(at["px"] - 30, at["py"] - 30)
        page.mouse.move(at["px"], at["py"], steps=5)
        try:
            expect(tip.locator(".text")).to_have_text(re.compile(label), timeout=10_000)
            break
        except AssertionError:
            # A map drawn again after the aim (Streamlit remounts a graph when it measures its
            # width again) or a page that moved leaves the mouse still, off the point, and a
            # still mouse sends no new hover: aim again at where the point is now.
            at = page.evaluate(POINT_NOW, [pt["key"], pt["trace"], pt["id"]]) or at
            if attempt == 2:
                raise
    expect(tip).to_be_visible()
    return tip


def unhover(page: Any) -> None:
    page.mouse.move(5, 5)  # off the map: the tooltip goes
    page.locator("#das-thumb-tip").wait_for(state="hidden", timeout=10_000)


def test_explore_map_hover_thumbnail_and_slider(page: Any, server: AppServer) -> None:
    before = open_explore(page, server)

    # hover a real point: the thumbnail tooltip shows its image, cut out of a sprite sheet
    # that the static file server serves
    pt = page.evaluate(ISOLATED_POINT, ["explore_map", True])
    assert pt and pt["gap"] > 3, pt
    with page.expect_response(lambda r: "/app/static/cache/" in r.url, timeout=20_000) as sheet:
        tip = hover(page, pt)
    assert sheet.value.status == 200, sheet.value.url
    assert sheet.value.headers.get("content-type", "").startswith("image/")
    assert f"#{pt['id']}" in tip.inner_text(), (tip.inner_text(), pt)
    bg = page.evaluate("() => getComputedStyle(document.querySelector('#das-thumb-tip .thumb')).backgroundImage")
    url = re.search(r'url\("?([^")]+)"?\)', bg)
    assert url and "/app/static/cache/" in url.group(1), bg
    resp = page.request.get(url.group(1) if url.group(1).startswith("http") else server.url + url.group(1))
    assert resp.status == 200 and len(resp.body()) > 100
    unhover(page)

    # r_s: three steps to the right with the keyboard re-produce the points
    thumb = page.locator('.st-key-r_s input[type="range"]')
    value0 = float(thumb.input_value())
    thumb.focus()
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    wait_produced_moved(page, before)
    wait_idle(page)
    after = produced_signature(page)
    assert after is not None and after[0] == before[0] and after != before
    # three slider steps of 0.001, read back as decimal text: a few float64 ulps from value0 + 0.003
    assert float(thumb.input_value()) == pytest.approx(value0 + 0.003)
    assert_clean(page)


def test_explore_hover_tooltip_names_real_and_produced_points(page: Any, server: AppServer) -> None:
    """The tooltip says what is hovered: a real point's class and index, a produced point's
    anchor (whose image it shows)."""
    open_explore(page, server)
    pt = page.evaluate(ISOLATED_POINT, ["explore_map", True])
    text = hover(page, pt).inner_text()
    assert f"#{pt['id']}" in text and pt["trace"] in text, (text, pt)
    unhover(page)
    pt = page.evaluate(ISOLATED_POINT, ["explore_map", False])
    assert pt["gap"] > 3, pt
    text = hover(page, pt).inner_text()
    assert f"anchor #{pt['id']}" in text and "round " in text and pt["trace"] in text, (text, pt)
    # Plotly's own label is hidden while ours shows (it would repeat the same words)
    assert page.evaluate("() => getComputedStyle(document.querySelector('.st-key-explore_map .hoverlayer')).visibility") == "hidden"


def test_explore_box_selection_shows_the_images(page: Any, server: AppServer) -> None:
    open_explore(page, server)
    # the modebar's Box Select, then a drag over the densest spot of real points
    page.locator(".st-key-explore_map").hover()
    page.locator('.st-key-explore_map .modebar-btn[data-title="Box Select"]').click()
    box = page.evaluate(DENSE_BOX, "explore_map")
    assert box["n"] >= 3, box
    mark = page.runs.mark
    page.mouse.move(box["x0"], box["y0"])
    page.mouse.down()
    page.mouse.move((box["x0"] + box["x1"]) / 2, (box["y0"] + box["y1"]) / 2, steps=5)
    page.mouse.move(box["x1"], box["y1"], steps=5)
    page.mouse.up()
    page.runs.wait_finished(after=mark, timeout=60)
    wait_idle(page)
    assert_clean(page)
    page.get_by_text("Export selection (CSV)").wait_for(timeout=10_000)
    heading = page.locator("h3", has_text="Selection:").inner_text()
    n_sel = int(re.search(r"Selection: ([\d,]+) real points", heading).group(1).replace(",", ""))
    assert n_sel >= 3, heading
    # the images come after the heading (one st.image each, loaded from the split): waited for
    expect(page.locator('[data-testid="stImage"]')).to_have_count(min(n_sel, 60), timeout=30_000)



def test_many_classes_hover_names_the_class_and_the_legend_stays_short(
        page: Any, server: AppServer, app_root: Path, many_class_run: Path) -> None:
    """520 classes: one trace of every point, the class in each point's tooltip, and a legend of
    the few highlighted classes only."""
    install_run(many_class_run, app_root / "runs", name="many-classes")
    open_page(page, server, "", checkpoint="run · many-classes")
    wait_for_produced(page)
    wait_idle(page)  # the run finishes below the map: the page stops moving before we aim
    names = [t["name"] for t in traces(page, "explore_map") or []]
    assert "all 520 classes" in names
    legend = page.locator(".st-key-explore_map .legend .traces")
    assert 0 < legend.count() <= 2 * 5 + 1, legend.count()  # 5 highlighted classes, their produced points, links
    pt = page.evaluate(ISOLATED_POINT, ["explore_map", True])
    assert pt and pt["gap"] > 3, pt
    # a highlighted point has a twin at distance 0 in the trace of every point, so the most
    # isolated one is from that trace, whose points carry their class as text
    assert pt["trace"] == "all 520 classes" and pt["text"], pt
    text = hover(page, pt).inner_text()
    assert pt["text"] in text and "all 520" not in text, (text, pt)
    unhover(page)
    assert_clean(page)

# -- DAS internals --------------------------------------------------------------------------------


def test_das_internals_heatmap_and_banks(page: Any, server: AppServer) -> None:
    open_page(page, server, "das_internals", checkpoint=RUN_LABEL)
    page.get_by_text("This checkpoint was trained with DAS").wait_for()
    heat = traces(page, "internals_heatmap")
    assert heat and heat[0]["type"] == "heatmap" and heat[0]["n"] == 5  # one row per training class
    assert any(t["name"].startswith("mask") for t in heat)
    page.get_by_role("tab", name="Memory banks").click()
    page.wait_for_function("() => !!document.querySelector('.st-key-internals_bank .js-plotly-plot .main-svg')")
    fill = traces(page, "internals_fill")
    assert fill and fill[0]["type"] == "bar" and fill[0]["n"] == 5
    bank = traces(page, "internals_bank")
    assert bank and bank[0]["type"] == "heatmap" and bank[0]["n"] >= 1
    assert traces(page, "internals_norms")
    page.get_by_role("tab", name="Shift preview on the map").click()
    page.wait_for_function(
        "() => { const gd = document.querySelector('.st-key-internals_preview .js-plotly-plot');"
        " return !!(gd && gd._fullData && gd._fullData.some(t => String(t.name).startsWith('produced'))); }",
        timeout=120_000,
    )
    wait_idle(page)
    assert_clean(page)


# -- Retrieve -------------------------------------------------------------------------------------


def _digit_png(index: int = 0) -> bytes:
    """A digits image (8x8, 16 grey levels) as a 64x64 PNG."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    img = (load_digits().images[index] * (255 / 16)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").resize((64, 64), Image.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def test_retrieve_upload_query_and_a_broken_upload(page: Any, server: AppServer) -> None:
    open_page(page, server, "retrieve", checkpoint=RUN_LABEL)
    page.locator(".st-key-retrieve_source").get_by_text("an upload").click()
    uploader = page.locator('.st-key-retrieve_upload input[type="file"]')
    uploader.wait_for(state="attached")
    wait_idle(page)
    uploader.set_input_files({"name": "query-digit.png", "mimeType": "image/png", "buffer": _digit_png(0)})
    caption = page.get_by_text(re.compile(r"answered in \d+ ms"))
    caption.first.wait_for(timeout=120_000)
    wait_idle(page)
    captions = page.locator('[data-testid="stImageCaption"]').all_inner_texts()
    results = [c for c in captions if re.fullmatch(r"\d+\. .+ · #\d+ · d \d+\.\d{3}", c.strip())]
    assert len(results) == 8, captions  # k = 8 by default
    dists = [float(t.rsplit("d ", 1)[1]) for t in results]
    assert dists == sorted(dists)
    assert page.get_by_text("Query: query-digit.png · 64×64").count() == 1
    assert_clean(page)

    mark = page.runs.mark
    page.locator('.st-key-retrieve_upload [data-testid="stFileChipDeleteBtn"] button').click()
    wait_idle(page, after=mark)  # the uploader asks for a rerun without the file
    uploader.set_input_files({"name": "x.png", "mimeType": "image/png", "buffer": b"this is not a PNG at all" * 10})
    err = page.locator(ERROR)
    err.first.wait_for(timeout=60_000)
    wait_idle(page)
    assert "cannot be used as a query" in err.first.inner_text()
    assert page.locator(EXCEPTION).count() == 0
    assert_clean(page, allow_errors=("cannot be used as a query",))


# -- Train ----------------------------------------------------------------------------------------


def test_train_quick_job_queued_and_cancelled(page: Any, server: AppServer, app_root: Path) -> None:
    from das_core.store import jobs

    runs = app_root / "runs"
    open_page(page, server, "train", checkpoint=None)
    preset = page.locator('input[aria-label="Preset (fills the form)"]')
    preset.click()
    mark = page.runs.mark
    page.get_by_role("option", name=re.compile(r"^cpu-quick:")).click()
    wait_idle(page, after=mark)  # the preset's on_change fills the form in a rerun
    assert preset.input_value().startswith("cpu-quick")
    assert page.locator('input[aria-label="dataset"]').input_value() == "digits"
    assert page.locator('input[aria-label="backbone"]').input_value() == "small-cnn"
    # long enough that it cannot finish before it is cancelled
    epochs = page.locator('input[aria-label="epochs"]')
    epochs.fill("40")
    mark = page.runs.mark
    epochs.press("Enter")  # a number input sends its value (and asks for a rerun) on Enter
    wait_idle(page, after=mark)
    page.locator('input[aria-label="Job name (optional)"]').fill("browser test job")
    mark = page.runs.mark
    page.locator('input[aria-label="Job name (optional)"]').press("Enter")
    wait_idle(page, after=mark)
    assert_clean(page)

    page.locator(".st-key-train_submit").get_by_role("button", name="Start training").click()
    page.get_by_text("Queued browser test job").wait_for(timeout=30_000)
    (job,) = [j for j in jobs.list_jobs(runs) if j.name == "browser test job"]
    assert job.config["dataset"] == "digits" and job.config["epochs"] == 40
    jobs_col = page.locator('[data-testid="stColumn"]').filter(has=page.get_by_role("heading", name="Jobs")).last
    jobs_col.get_by_text(job.id).first.wait_for(timeout=30_000)
    jobs_col.get_by_text(re.compile(r"^(⏳ queued|▶ running)$")).first.wait_for(timeout=30_000)
    cancel = page.locator(f".st-key-train_cancel_{job.id}").get_by_role("button", name="Cancel")
    cancel.wait_for(timeout=30_000)
    cancel.click()
    jobs_col.get_by_text("■ cancelled").first.wait_for(timeout=60_000)
    assert jobs.get_job(job.id, runs).state == "cancelled"
    expect(page.locator(f".st-key-train_cancel_{job.id}")).to_have_count(0, timeout=10_000)  # no Cancel any more
    assert_clean(page)
    # the training process is gone (the worker exits by itself once its queue is empty)
    final = jobs.get_job(job.id, runs)
    if final.pid:
        deadline = time.monotonic() + 20  # polled: the process is gone when /proc says so
        while time.monotonic() < deadline and Path(f"/proc/{final.pid}").exists():
            time.sleep(0.2)
        assert not Path(f"/proc/{final.pid}/cmdline").exists() or str(final.run_dir) not in Path(
            f"/proc/{final.pid}/cmdline").read_bytes().decode(errors="replace")


# -- Compare --------------------------------------------------------------------------------------


def test_compare_lists_the_run(page: Any, server: AppServer) -> None:
    open_page(page, server, "compare", checkpoint=None)
    page.locator('[data-testid="stDataFrame"]').first.wait_for()
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=\"stDataFrame\"] td')].some(td => td.innerText.trim() === 'digits-das')",
        timeout=30_000,
    )
    cells = page.locator('[data-testid="stDataFrame"]').first.locator("td").all_inner_texts()
    row = cells.index("digits-das")
    assert cells[row + 1] == "run" and cells[row + 2] == "digits"
    assert traces(page, "compare_r1")  # the curves
    assert_clean(page)


# -- README screenshots (DAS_UPDATE_SCREENSHOTS=1, on the demo checkpoint) ------------------------

SHOT_PAGES = ["explore", "das_internals", "retrieve", "train", "compare"]


@pytest.mark.skipif(not UPDATE_SCREENSHOTS, reason="README screenshots: set DAS_UPDATE_SCREENSHOTS=1 (make screenshots)")
@pytest.mark.parametrize("name", SHOT_PAGES)
def test_readme_screenshot(page: Any, server: AppServer, name: str) -> None:
    path = "" if name == "explore" else name
    checkpoint = DEMO_LABEL if name in ("explore", "das_internals", "retrieve") else None
    open_page(page, server, path, checkpoint=checkpoint, timeout=600)
    if name == "explore":
        wait_for_produced(page, timeout=600)
    elif name == "das_internals":
        page.wait_for_function(
            "() => { const gd = document.querySelector('.st-key-internals_heatmap .js-plotly-plot'); return !!(gd && gd._fullData); }"
        )
    elif name == "retrieve":
        page.get_by_text(re.compile(r"answered in \d+ ms")).first.wait_for(timeout=600_000)
    elif name == "train":  # a finished quick job, with its curves, in the job list
        page.locator('input[aria-label="Preset (fills the form)"]').click()
        mark = page.runs.mark
        page.get_by_role("option", name=re.compile(r"^cpu-quick:")).click()
        wait_idle(page, after=mark)
        page.locator(".st-key-train_submit").get_by_role("button", name="Start training").click()
        page.get_by_text("✔ done").first.wait_for(timeout=600_000)
        page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    elif name == "compare":
        mark = page.runs.mark
        page.locator(".st-key-compare_draw label").first.click()  # the label takes the click, not the hidden input
        wait_idle(page, timeout=600, after=mark)
        page.wait_for_function(
            "() => { const gd = document.querySelector('.st-key-compare_map_b .js-plotly-plot'); return !!(gd && gd._fullData); }",
            timeout=600_000,
        )
    wait_idle(page, timeout=600)
    wait_painted(page)  # every Plotly graph drawn at its size, and painted
    assert_clean(page)
    full_screenshot(page, SCREENSHOTS / f"{name}.png")
