"""Explore's download buttons in Chromium: the Parquet and TensorBoard files a person gets by
clicking them hold exactly what the map draws (the files are made on click, not on every run)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from browser_helpers import (
    AppServer,
    assert_clean,
    open_page,
    skip_without_chromium,
    traces,
    wait_for_produced,
)

from app_helpers import install_run

skip_without_chromium()

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def app_root(digits_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``runs/digits-das``: a copy of the digits run; an empty ``cache/``."""
    root = tmp_path_factory.mktemp("browser-byo")
    install_run(digits_run, root / "runs", name="digits-das")
    (root / "cache").mkdir()
    return root


def test_explore_downloads_what_the_map_shows(page: Any, server: AppServer) -> None:
    open_page(page, server, "", checkpoint="run · digits-das")
    wait_for_produced(page)
    # the produced traces are filled in after the figure (app.produced_layer), one round at a time:
    # wait for all of them (5 digit classes x 50 anchors x T = 3, Explore's defaults)
    n_produced = 5 * 50 * 3
    page.wait_for_function(
        """([key, n]) => { const gd = document.querySelector('.st-key-' + key + ' .js-plotly-plot');
              return !!(gd && gd._fullData) && gd._fullData.filter(t => String(t.name).startsWith('produced'))
                  .reduce((m, t) => m + (t.x ? t.x.length : 0), 0) === n; }""",
        arg=["explore_map", n_produced], timeout=120_000,
    )
    drawn = traces(page, "explore_map") or []
    n_real = sum(t["n"] for t in drawn if t["mode"] == "markers" and not t["name"].startswith("produced"))
    assert_clean(page)

    with page.expect_download(timeout=120_000) as dl:
        page.get_by_role("button", name="Download what is shown (Parquet)").click()
    df = pd.read_parquet(dl.value.path())
    assert dl.value.suggested_filename.endswith(".parquet")
    assert int((~df["produced"]).sum()) == n_real and int(df["produced"].sum()) == n_produced
    assert df.loc[df["produced"], "anchor"].notna().all() and df[["x", "y"]].notna().all().all()

    with page.expect_download(timeout=120_000) as dl:
        page.get_by_role("button", name="Download for TensorBoard's projector (.zip)").click()
    names = set(zipfile.ZipFile(io.BytesIO(Path(dl.value.path()).read_bytes())).namelist())
    assert names == {"tensors.tsv", "metadata.tsv", "sprite.png", "projector_config.pbtxt"}
    assert_clean(page)
