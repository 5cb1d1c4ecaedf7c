"""Compare: every run and demo checkpoint with its test metrics, their curves per epoch, the
benchmark tables of ``bench/``, and two checkpoints' maps of the same images, aligned, with
the points that moved most between them."""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st

from app import plots, state, widgets
from app.hover import enable_hover_thumbnails
from das_core.explorer import bench_view, compare, runs_view
from das_core.store.demo import available_demos
from das_core.store.runs import REPO_ROOT

st.title("Compare")
st.caption(
    "Runs side by side: the demo checkpoints, every run folder under the runs root and every sweep trial (with "
    "its r_s / r_b or other swept values), their metrics on "
    "the test classes (never seen in training), their curves, the benchmarks, and two checkpoints' maps "
    "of the same images."
)

# -- the table ------------------------------------------------------------------------------------
st.subheader("Runs")
with widgets.guard("Reading the runs"):
    rows = runs_view.runs_table(state.runs_root(), demos=available_demos())
if not rows:
    st.info(f"No run yet under `{state.runs_root()}` and no demo checkpoint: run `make demo-model`, or train one "
            "on the Train page.")
else:
    has_sel = any(r["selected epoch"] is not None for r in rows)
    show_sel = has_sel and st.toggle(
        "Also show the selected epoch (best validation metric, the one in best.safetensors) and its test metrics",
        value=True, key="compare_show_selected")
    pct = {m: st.column_config.NumberColumn(m, format="percent", help=f"test {m}, last evaluated epoch")
           for m in runs_view.METRICS}
    pct.update({f"sel. {m}": st.column_config.NumberColumn(f"sel. {m}", format="percent",
                                                            help=f"test {m} at the selected epoch")
                for m in runs_view.METRICS})
    order = ["name", "kind", *(["params"] if any(r["params"] for r in rows) else []), "dataset", "DAS", "loss", "miner", "seed", "epochs", "planned", "state",
             *runs_view.METRICS, "test epoch"]
    if show_sel:
        order += ["selected epoch", *(f"sel. {m}" for m in runs_view.METRICS)]
    order += ["backbone", "dim", "path"]
    st.dataframe(rows, column_order=order, column_config={
        **pct, "DAS": st.column_config.CheckboxColumn("DAS"),
        "epochs": st.column_config.NumberColumn("epochs", help="epochs finished"),
        "planned": st.column_config.NumberColumn("planned", help="epochs of the config"),
        "params": st.column_config.TextColumn("params", help="a sweep trial's swept values"),
    }, hide_index=True, width="stretch", key="compare_table")
    st.caption("Metrics on the test split (unseen classes), in %: R@k (a same-class image among the k nearest), "
               "MAP@R, NMI and F1 (k-means clustering). The last evaluated epoch, and the epoch selected on the "
               "validation split where the run has one (no selection on test classes).")

    # -- curves -----------------------------------------------------------------------------------
    st.subheader("Curves")
    with_curves = [r for r in rows if r["metrics"]]
    labels = {r["name"]: f"{r['name']} ({'DAS' if r['DAS'] else 'no DAS'}{', ' + r['params'] if r['params'] else ''})"
              for r in with_curves}
    # your runs first, then the demos (four demo checkpoints alone would fill the default)
    first = [r["name"] for r in with_curves if r.get("kind") != "demo"] + [
        r["name"] for r in with_curves if r.get("kind") == "demo"]
    chosen = st.multiselect("Runs to plot", list(labels), default=first[:4], key="compare_runs",
                            format_func=labels.__getitem__)
    show_val = st.toggle("Also the validation R@1 (dashed)", value=False, key="compare_val")
    r1: dict[str, tuple[Any, Any]] = {}
    loss: dict[str, tuple[Any, Any]] = {}
    with widgets.guard("Reading the curves"):
        for r in with_curves:
            if r["name"] not in chosen:
                continue
            c = runs_view.run_curves(r["metrics"])
            r1[f"{r['name']} · test"] = (c["epoch"], c["test R@1"])
            if show_val and any(v == v for v in c["val R@1"]):
                r1[f"{r['name']} · val"] = (c["epoch"], c["val R@1"])
            loss[r["name"]] = (c["epoch"], c["train_loss"])
    if chosen:
        a, b = st.columns(2)
        with a:
            st.markdown("**R@1 per epoch**")
            fig = plots.curves(r1, y_title="R@1", percent=True, height=340)
            fig.for_each_trace(lambda t: t.update(line={"dash": "dash"}) if t.name.endswith(" · val") else None)
            st.plotly_chart(fig, key="compare_r1", width="stretch")
        with b:
            st.markdown("**Training loss per epoch**")
            st.plotly_chart(plots.curves(loss, y_title="train loss", height=340), key="compare_loss",
                            width="stretch")

    if chosen:
        # -- DAS diagnostics (issue 11): why DAS helps or hurts, per epoch ----------------------------
        diags = {r["name"]: runs_view.run_diagnostics(r["metrics"]) for r in with_curves if r["name"] in chosen}
        keys = sorted({k for d in diags.values() for k in d if k != "epoch"},
                      key=lambda k: (not k.startswith("das_"), k))
        if keys:
            st.markdown("**DAS diagnostics per epoch** (measured on a few steps of each epoch; weight norms for "
                        "every run)")
            # default: the gradient ratio, the figure that explains DAS's effect on the fine-grained
            # benchmark (README); else the first
            first = "das_diagnostics.grad_ratio"
            key = st.selectbox("Diagnostic", keys, index=keys.index(first) if first in keys else 0,
                               key="compare_diag", format_func=lambda k: runs_view.DIAGNOSTIC_LABELS.get(k, k))
            series = {n: (d["epoch"], d[key]) for n, d in diags.items() if key in d}
            st.plotly_chart(plots.curves(series, y_title=runs_view.DIAGNOSTIC_LABELS.get(key, key), height=300),
                            key="compare_diag_chart", width="stretch")

# -- benchmarks -----------------------------------------------------------------------------------
st.subheader("Benchmarks")
bench = bench_view.bench_summary(REPO_ROOT / "bench" / "results")
if bench["das"] is not None:
    d = bench["das"]
    st.markdown("**Does DAS help?** Baseline vs + DAS on the embedded zero-shot split (test classes), mean ± std "
                "over seeds in %, the difference to the baseline in brackets." + (" *(quick smoke test)*" if d["quick"] else ""))
    st.dataframe(d["rows"], hide_index=True, width="stretch", key="compare_bench_das")
    settings = d["settings"] if isinstance(d["settings"], dict) else {}
    st.caption(f"`{d['file']}` · " + ", ".join(f"{k} {v}" for k, v in settings.items()))
if bench["step"] is not None:
    s = bench["step"]
    st.markdown("**Cost of DAS per training step** (median step time, plain vs + DAS)"
                + (" *(quick smoke test)*" if s["quick"] else ""))
    st.dataframe(s["rows"], hide_index=True, width="stretch", key="compare_bench_step")
    extra = s["extra"]
    verdict = (f" · worst ratio of our miners ×{extra['worst_ratio_ours']:.2f} (target ≤ {extra['target']}: "
               f"{'met' if extra.get('passed') else 'missed'})") if "worst_ratio_ours" in extra else ""
    st.caption(f"`{s['file']}` · {s['settings'] or ''}{verdict}")
for note in bench["missing"]:
    st.info(note)

# -- two maps -------------------------------------------------------------------------------------
st.subheader("Two checkpoints, the same images")
st.caption("Both checkpoints embed the same split; checkpoint B's map is rotated, scaled and translated onto A's "
           "(orthogonal Procrustes over all points), and the points whose positions differ most are listed.")
choices = state.checkpoint_choices()
if len(choices) < 2:
    st.info("Two checkpoints are needed: train another one on the Train page.")
    st.stop()
paths = [c.path for c in choices]
demo_paths = [c.path for c in choices if c.kind == "demo"]
defaults = (demo_paths + [p for p in paths if p not in demo_paths])[:2]
for key, default in zip(("compare_ckpt_a", "compare_ckpt_b"), defaults, strict=True):
    if st.session_state.get(key) not in paths:
        st.session_state[key] = default
ca, cb = st.columns(2)
with ca:
    ckpt_a = widgets.checkpoint_picker(key="compare_ckpt_a", label="Checkpoint A", sidebar=False, upload=False)
    st.caption(widgets.checkpoint_caption(ckpt_a))
with cb:
    ckpt_b = widgets.checkpoint_picker(key="compare_ckpt_b", label="Checkpoint B", sidebar=False, upload=False)
    st.caption(widgets.checkpoint_caption(ckpt_b))

if ckpt_a.config.dataset != ckpt_b.config.dataset:
    st.warning(f"These two cannot be compared point by point: {compare.comparable(ckpt_a.config, ckpt_b.config, 'test')}. "
               "Pick two checkpoints of the same dataset.")
    st.stop()
with widgets.guard("Loading the datasets"):
    avail = [s for s in state.splits(ckpt_a).available() if s in state.splits(ckpt_b).available()] or ["test"]
split_names = {"train": "train (training classes)", "val": "validation", "test": "test (unseen classes)"}
split = str(st.radio("Split", avail, index=avail.index("test") if "test" in avail else 0, horizontal=True,
                     key="compare_split", format_func=lambda s: split_names.get(s, s)))
reason = compare.comparable(ckpt_a.config, ckpt_b.config, split)
if reason is not None:
    st.warning(f"These two cannot be compared point by point: {reason}. Pick two checkpoints of the same dataset.")
    st.stop()
if str(ckpt_a.path) == str(ckpt_b.path):
    st.info("A and B are the same checkpoint: pick two different ones to see what moved.")
draw = st.toggle("Compute and draw the two maps (embeddings and maps are computed once, then cached on disk)",
                 value=False, key="compare_draw")
if not draw:
    st.stop()

k = int(st.slider("Points that moved most", 5, 60, 20, 5, key="compare_k"))
with widgets.guard("Embedding the split"):
    es_a = state.embedding_set(ckpt_a, split)
    es_b = state.embedding_set(ckpt_b, split)
if len(es_a) != len(es_b) or not np.array_equal(es_a.labels, es_b.labels):
    st.warning("The two checkpoints' splits do not hold the same images (different sizes or labels): "
               "they cannot be compared point by point.")
    st.stop()
with widgets.guard("Fitting the maps"):
    mp_a = state.umap_map(ckpt_a, es_a)
    mp_b = state.umap_map(ckpt_b, es_b)
with widgets.guard("Aligning the maps"):
    shift = compare.map_shift(mp_a.coords, mp_b.coords, es_a.labels, es_a.class_names,
                              emb_a=es_a.embeddings, emb_b=es_b.embeddings, k=k)
try:
    thumbs = state.sprites(ckpt_a, split)
except Exception:  # hover thumbnails are a convenience
    thumbs = None
enable_hover_thumbnails()
names = es_a.class_names
ids = np.arange(len(es_a))
ma, mb = st.columns(2)
for col, title, xy, key in ((ma, f"A · {ckpt_a.name}", mp_a.coords, "compare_map_a"),
                            (mb, f"B · {ckpt_b.name} (aligned to A)", shift.aligned_b, "compare_map_b")):
    with col:
        fig = plots.embedding_map(xy, es_a.labels, names, ids, highlight=(xy[shift.moved], f"moved most ({k})"),
                                  thumbs=thumbs, uirevision=key, height=520, title=title, point_size=3)
        st.plotly_chart(fig, key=key, width="stretch")
st.caption("★ the points that moved most. Displacement is measured once both maps are scaled to unit RMS radius "
           "(1 = a map's typical radius), with the alignment refitted without the 10 % that moved most. The "
           "neighbourhood columns are measured in each checkpoint's own embedding space, not on the maps.")
t1, t2 = st.columns([3, 2])
with t1:
    st.dataframe(shift.rows, hide_index=True, width="stretch", key="compare_moved")
with t2:
    dataset = state.splits(ckpt_a).get(split)
    cols = st.columns(5)
    for j, row in enumerate(shift.rows):
        with widgets.guard("Loading an image"):
            img = state.display_image(dataset, row["index"], size=80)
        cols[j % 5].image(img, caption=f"{row['rank']}. #{row['index']} {row['class']}", width="stretch")
