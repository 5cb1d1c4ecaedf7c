"""Timeline: how the embedding space forms while training, a baseline run and a DAS run side by
side. Every run stores the embeddings of a fixed subset of test images (the probe, the same for
every run of a dataset) before training and after each epoch; here each epoch's probe embeddings
are mapped, aligned to the epoch before, and played as an animation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from app import state, widgets
from app.hover import enable_hover_thumbnails
from app.timeline_plot import timeline_animation
from das_core.explorer import runs_view
from das_core.explorer import timeline as tl
from das_core.store.timeline import load_timeline

st.title("Timeline")
st.caption(
    "Each run stores the embeddings of a fixed subset of test images (unseen classes; the same images for every "
    "run of a dataset) before training (epoch 0) and after every epoch. Each epoch's embeddings get their own "
    "UMAP map, aligned onto the previous epoch's (Procrustes), and the maps play as an animation: a baseline "
    "run and a DAS run side by side show how DAS changes the space while training."
)


def _stamp(path: str) -> tuple[int, int]:
    st_ = Path(path).stat()
    return st_.st_mtime_ns, st_.st_size


@st.cache_data(show_spinner="Mapping the timeline: one UMAP map per epoch (about a second each)…", max_entries=16)
def _maps(run_dir: str, stamp: tuple[int, int]) -> tl.TimelineMaps:
    return tl.get_timeline_maps(run_dir)  # also cached on disk, across sessions and restarts


def maps_of(run_dir: str) -> tl.TimelineMaps:
    from das_core.store.timeline import timeline_path

    return _maps(run_dir, _stamp(str(timeline_path(run_dir))))


with widgets.guard("Reading the runs"):
    rows = tl.timeline_runs(runs_view.runs_table(state.runs_root()))
if not rows:
    st.info(f"No run under `{state.runs_root()}` has a training timeline yet. Every new run records one "
            "(`--timeline-probe N` test images, 2,000 by default): train a baseline and a DAS run on the Train page, "
            "or `python -m das_core train --dataset digits --epochs 10` with and without `--das`.")
    st.stop()

by_name = {str(r["name"]): r for r in rows}
labels = {n: f"{n} ({'DAS' if r['DAS'] else 'no DAS'}, {r['params'] + ', ' if r.get('params') else ''}{r['dataset']}, "
              f"{r['epochs']} epochs)" for n, r in by_name.items()}
names = list(by_name)
baseline = next((n for n in names if not by_name[n]["DAS"]), names[0])
das_run = next((n for n in names if by_name[n]["DAS"] and n != baseline), next((n for n in names if n != baseline), baseline))
ca, cb = st.columns(2)
with ca:
    a = str(st.selectbox("Run A (e.g. the baseline)", names, index=names.index(baseline), key="timeline_a",
                         format_func=labels.__getitem__))
with cb:
    b = str(st.selectbox("Run B (e.g. with DAS)", names, index=names.index(das_run), key="timeline_b",
                         format_func=labels.__getitem__))

with widgets.guard("Reading the timelines"):
    tl_a = load_timeline(str(by_name[a]["path"]))
    tl_b = load_timeline(str(by_name[b]["path"]))
reason = tl.comparable(tl_a, tl_b)
if reason is not None:
    st.warning(f"These two runs cannot be played side by side: {reason}. Pick two runs of the same dataset.")
    st.stop()

with widgets.guard("Mapping the timelines"):
    maps_a = maps_of(str(by_name[a]["path"]))
    maps_b = tl.align_runs(maps_a, maps_of(str(by_name[b]["path"]))) if a != b else maps_a
    epochs, frame_rows = tl.frame_schedule(maps_a.epochs, maps_b.epochs)

# Hover thumbnails: the sprites of the probed split (the test split: the whole split, shared with
# Explore and Compare on the same checkpoint), built from the checkpoint of run A (else B: both
# probe the same images); each point carries its index in that split, as the run stored it.
ids = tl_a.indices
thumbs: dict[str, Any] | None = None
source = next((by_name[n]["checkpoint"] for n in (a, b) if by_name[n]["checkpoint"]), None)
if source is None:
    st.info("Hover thumbnails show once a run has a checkpoint (after its first epoch).")
else:
    try:
        thumbs = state.sprites(state.load_checkpoint(str(source)), str(tl_a.meta.get("split", "test")))
        ids = tl.thumbnail_ids(tl_a, int(thumbs["count"]))
    except Exception as exc:  # thumbnails are a convenience: the animation works without them
        thumbs = None
        st.info(f"Hover thumbnails are unavailable ({type(exc).__name__}: {exc}).")
enable_hover_thumbnails()

panels: list[tuple[str, Any]] = [(f"A · {a}", maps_a.coords), (f"B · {b}", maps_b.coords)]
fig = timeline_animation(panels, frame_rows, epochs, maps_a.labels, maps_a.class_names, ids, thumbs=thumbs)
st.plotly_chart(fig, key="timeline_chart", width="stretch")
st.caption(
    f"{len(maps_a.labels):,} probe images of {len(maps_a.class_names)} test classes, {len(epochs)} frames (epoch 0 "
    f"= before training). Method: {maps_a.method}; run B's maps are then moved as a whole onto run A's last map, so "
    "the two end in the same frame of reference. ▶ Play runs the epochs in order; the slider steps through them; "
    "hover a point to see its image."
)
