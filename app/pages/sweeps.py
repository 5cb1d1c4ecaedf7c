"""Sweeps: the metric of every trial of an Optuna sweep over the two options it searched (r_s and
r_b), the best trial named, and any trial opened in Explore. Sweeps are started on the Train
page (or with ``python -m das_core sweep``); this page reads their folders under the runs root."""

from __future__ import annotations

from typing import Any

import streamlit as st

from app import state, widgets
from app.sweep_plots import sweep_map
from das_core.explorer.sweep_view import trial_points
from das_core.store import sweeps

st.title("Sweeps")
st.caption(
    "Optuna sweeps over r_s, r_b (or any training option): each trial is an ordinary run, scored by the "
    "metric the sweep names. Start one on the Train page or with `python -m das_core sweep`."
)

folders = sweeps.find_sweeps(state.runs_root())
if not folders:
    st.info("No sweep yet: start one on the Train page (*Sweep over this config*), or run "
            "`python -m das_core sweep --preset cpu-quick --das --val-fraction 0.2 --param r_s=0.01,0.1 "
            f"--param r_b=0.01,0.5 --sampler grid --out {state.runs_root()}/sweep1`.")
    st.stop()
names = [f.name for f in folders]
if st.session_state.get("sweep_pick") not in names:
    st.session_state["sweep_pick"] = names[0]
picked = st.selectbox("Sweep", names, key="sweep_pick")
folder = folders[names.index(picked)]

with widgets.guard(f"Reading the sweep {picked}"):
    view = sweeps.load_sweep(folder)
cfg = view.config
labels = view.labels
c1, c2 = st.columns(2)
x = c1.selectbox("x axis", labels, index=0, key="sweep_x")
rest = [lab for lab in labels if lab != x]
y = c2.selectbox("y axis", rest, index=0, key="sweep_y") if rest else None
if not rest:
    c2.caption(f"One option searched: the y axis is {cfg.metric}.")


def fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def draw() -> None:
    with widgets.guard("Reading the sweep"):
        current = sweeps.load_sweep(folder)
    counts: dict[str, int] = {}
    for t in current.trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    done = len(current.complete)
    st.caption(
        f"{cfg.sampler.upper()} over " + ", ".join(p.spec() for p in cfg.params)
        + f" · scored by **{cfg.metric}** ({cfg.direction}) · {done} of {current.target} trials finished"
        + "".join(f" · {n} {s}" for s, n in counts.items() if s != "complete")
        + f" · base: {cfg.base.dataset}, {cfg.base.loss}{' + DAS' if cfg.base.das else ''}, {cfg.base.epochs} epochs"
    )
    best = current.best
    if best is not None:
        shown = ", ".join(f"{k} = {fmt(v)}" for k, v in best.params.items())
        st.success(f"**Best: trial {best.number}** · {shown} · {cfg.metric} {best.value:.4f}")
    elif not current.trials:
        st.info("No trial has started yet (a queued sweep waits for its worker).")
    pts = trial_points(current, x, y)
    st.plotly_chart(sweep_map(pts, cfg.metric), key="sweep_map", width="stretch")
    rows = [{"trial": t.number, "state": t.state, **{k: t.params.get(k) for k in labels},
             cfg.metric: t.value, "test R@1": t.scores.get("test", {}).get("R@1"), "run folder": t.run_dir.name}
            for t in current.trials]
    if rows:
        st.dataframe(rows, hide_index=True, width="stretch", key="sweep_table")


if view.finished:
    draw()
else:
    st.fragment(run_every=5.0)(draw)()

# -- open a trial in Explore ------------------------------------------------------------------------
openable = [t for t in view.trials if t.checkpoint is not None]
if openable:
    best = view.best
    default = next((i for i, t in enumerate(openable) if best is not None and t.number == best.number), 0)
    pick = st.selectbox(
        "Trial to open", range(len(openable)), index=default, key="sweep_open_pick",
        format_func=lambda i: f"trial {openable[i].number} · "
        + ", ".join(f"{k}={fmt(v)}" for k, v in openable[i].params.items())
        + (f" · {cfg.metric} {openable[i].value:.4f}" if openable[i].value is not None else "")
        + (" (best)" if best is not None and openable[i].number == best.number else ""),
    )
    if st.button("Open in Explore", key="sweep_open", type="primary"):
        ckpt = openable[pick].checkpoint
        assert ckpt is not None
        st.session_state["ckpt_path"] = str(ckpt)  # the checkpoint pickers list every trial
        st.switch_page("app/pages/explore.py")
