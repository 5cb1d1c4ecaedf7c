"""Sweeps in the real app, in headless Chromium (issue 13, item 4): the Sweeps page draws a
finished 2 x 2 grid sweep (made by the library in a fixture) as the metric over (r_s, r_b), with
every trial marked and the best named; a trial opens in Explore; and the Train page queues a
sweep through the job queue.

One app server for the module whose runs root holds the sweep; each test opens its own tab."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from browser_helpers import (
    SIDEBAR_CHECKPOINT,
    AppServer,
    assert_clean,
    skip_without_chromium,
    traces,
    wait_for_produced,
    wait_idle,
)

skip_without_chromium()

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SWEEP = "sweep-digits"


@pytest.fixture(scope="module")
def app_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``runs/sweep-digits``: a finished grid sweep of 2 x 2 tiny digits trials (r_s x r_b)."""
    from das_core.training.config import TrainConfig
    from das_core.training.sweep import build_sweep, run_sweep

    root = tmp_path_factory.mktemp("browser-sweep")
    base = TrainConfig.from_mapping({
        "dataset": "digits", "backbone": "small-cnn", "embedding_dim": 16, "batch_size": 50,
        "samples_per_class": 10, "epochs": 1, "steps_per_epoch": 3, "device": "cpu", "das": True,
        "val_fraction": 0.2,
    })  # fmt: skip
    sweep = build_sweep(base, ["r_s=0.01,0.3", "r_b=0.01,0.5"], sampler="grid")
    run_sweep(sweep, root / "runs" / SWEEP)
    (root / "cache").mkdir()
    return root


def best_trial(app_root: Path) -> dict[str, Any]:
    best = json.loads((app_root / "runs" / SWEEP / "summary.json").read_text())["best"]
    assert isinstance(best, dict)
    return best


def open_sweeps(page: Any, server: AppServer) -> list[dict[str, Any]]:
    page.goto(f"{server.url}/sweeps")
    page.wait_for_function(
        """() => { const r = document.querySelector('.st-key-sweep_map');
                   const gd = r && r.querySelector('.js-plotly-plot');
                   return !!(gd && gd._fullData && gd._fullData.some(t => String(t.name).startsWith('best'))); }""",
        timeout=120_000,
    )
    wait_idle(page)
    found = traces(page, "sweep_map")
    assert found
    return found


def test_sweeps_page_draws_every_trial_over_r_s_and_r_b_and_names_the_best(
    page: Any, server: AppServer, app_root: Path
) -> None:
    found = open_sweeps(page, server)
    by_name = {t["name"]: t for t in found}
    assert [t["type"] for t in found if t["type"] == "contour"] == ["contour"]  # the metric over (r_s, r_b)
    assert by_name["trials"]["n"] == 4  # every trial marked
    best = best_trial(app_root)
    (star,) = [t for t in found if t["name"].startswith(f"best: trial {best['trial']} (val.R@1 ")]
    assert star["n"] == 1
    page.get_by_text(re.compile(rf"Best: trial {best['trial']}\b")).first.wait_for()
    page.get_by_text("4 of 4 trials finished", exact=False).first.wait_for()
    # the axes are the searched options
    titles = page.evaluate("""() => { const gd = document.querySelector('.st-key-sweep_map .js-plotly-plot');
                                       return [gd._fullLayout.xaxis.title.text, gd._fullLayout.yaxis.title.text]; }""")
    assert titles == ["r_s", "r_b"]
    assert_clean(page)


def test_a_trial_opens_in_explore(page: Any, server: AppServer, app_root: Path) -> None:
    open_sweeps(page, server)
    best = best_trial(app_root)
    assert f"trial {best['trial']} · " in page.locator('input[aria-label="Trial to open"]').input_value()
    page.locator(".st-key-sweep_open").get_by_role("button", name="Open in Explore").click()
    label = f"sweep · {SWEEP} · {best['run_dir']}"
    page.wait_for_function(
        "([sel, label]) => { const e = document.querySelector(sel); return !!e && e.value === label; }",
        arg=[SIDEBAR_CHECKPOINT, label], timeout=60_000,
    )
    n_produced, _ = wait_for_produced(page, timeout=240)  # the trial's map, with DAS's points on it
    assert n_produced > 0
    wait_idle(page, timeout=240)
    assert_clean(page)


def test_train_page_queues_a_sweep(page: Any, server: AppServer, app_root: Path) -> None:
    from das_core.store import jobs, sweeps

    runs = app_root / "runs"
    page.goto(f"{server.url}/train")
    wait_idle(page, timeout=120)
    preset = page.locator('input[aria-label="Preset (fills the form)"]')
    preset.click()
    page.get_by_role("option", name=re.compile(r"^cpu-quick:")).click()
    wait_idle(page, start_grace=1.0)
    page.get_by_text("Sweep over this config", exact=False).click()
    space = page.locator('textarea[aria-label="Search space, one option per line"]')
    space.wait_for()
    space.fill("lr=0.001,0.002")
    space.press("Control+Enter")
    wait_idle(page, start_grace=1.0)
    page.get_by_text("2 trials of 2 epoch(s) each.").wait_for()
    page.locator(".st-key-sweep_submit").get_by_role("button", name="Start sweep").click()
    page.get_by_text("Queued sweep", exact=False).first.wait_for(timeout=30_000)
    (job,) = [j for j in jobs.list_jobs(runs) if j.kind == "sweep"]
    saved = sweeps.read_sweep_config(job.run_dir)
    assert [p.spec() for p in saved.params] == ["lr=0.001,0.002"] and saved.sampler == "grid"
    assert saved.base.dataset == "digits" and saved.metric == "test.R@1"  # cpu-quick has no validation split
    jobs.cancel(job.id, runs)  # the queue running a sweep to its end is tested in test_sweep.py
    assert_clean(page)
