"""DAS internals: the frequency recorder P and mask M (DFS), the memory banks (MTS), and where
the memorised shifts ``v + r_b·t`` put one anchor on the map."""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import plots, state, widgets
from app.hover import enable_hover_thumbnails
from das_core.training.ranges import R_B

st.title("DAS internals")
st.caption(
    "What Densely-Anchored Sampling has learnt about each training class: which embedding dimensions "
    "fire most (the frequency recorder P and its top-K mask M, used by discriminative feature scaling) "
    "and which same-class differences it memorised (the banks, used by memorized transformation shifting)."
)

ckpt = widgets.checkpoint_picker(external=True)
st.caption(widgets.checkpoint_caption(ckpt))
cfg = ckpt.config
names = ckpt.class_names

if ckpt.has_das:
    with widgets.guard("Reading the DAS state"):
        das = state.trained_das(ckpt)
    st.success(f"This checkpoint was trained with DAS: its state after epoch {ckpt.epoch} is shown.")
elif state.is_external(ckpt):
    st.info("An embeddings file holds no DAS state: this is a what-if. The frequency recorder and banks below are "
            f"computed by feeding the file's embeddings to DAS in {cfg.samples_per_class}-per-class batches, as "
            "training would, with the default DAS settings; the r_b slider then shows the shifts it would apply.")
    with widgets.guard("Computing the DAS state"):
        das, _ = state.das_for_split(ckpt, state.embedding_set(ckpt, "train"))
    if das is None:
        st.error("The file has fewer than two classes: DAS has nothing to do.")
        st.stop()
else:
    st.warning(
        "This checkpoint was trained **without DAS**, so it holds no frequency recorder or banks. DAS Explorer "
        "can compute them by feeding the training split's embeddings to DAS in "
        f"{cfg.samples_per_class}-per-class batches, as training would (state updates only)."
    )
    if not st.toggle("Compute the DAS state over the training split", key="internals_compute"):
        st.stop()
    with widgets.guard("Embedding the training split"):
        es_train = state.embedding_set(ckpt, "train")
    with widgets.guard("Computing the DAS state"):
        das, _ = state.das_for_split(ckpt, es_train)
    if das is None:
        st.error("The training split has fewer than two classes: DAS has nothing to do.")
        st.stop()

freq = das.frequency.detach().cpu().numpy()
mask = das.mask.detach().cpu().numpy()
n_classes, dim = freq.shape
many = plots.is_many(n_classes)
if many:
    st.info(f"{n_classes:,} classes: the heatmap, the bank charts and the tables show the classes picked below "
            "(type part of a class name to find it); every class's state is one pick away.")
st.markdown(
    f"**{n_classes} classes × {dim} dimensions** · K = {das.topk} · bank size Z = {das.bank_size} · "
    f"T = {das.num_produce} · r_s = {das.r_s:g} · r_b = {das.r_b:g} · "
    f"DFS {'on' if das.use_dfs else 'off'} · MTS {'on' if das.use_mts else 'off'}"
)

tab_p, tab_bank, tab_preview = st.tabs(["Frequency recorder P and mask M", "Memory banks", "Shift preview on the map"])

with tab_p:
    if not das.use_dfs or freq.sum() == 0:
        st.info("DFS was off: the frequency recorder is empty.")
    rows = list(range(n_classes))
    if many:  # default: the 10 classes DAS saw most embeddings of
        busiest = sorted(int(c) for c in np.argsort(-freq.sum(axis=1), kind="stable")[:10])
        rows = widgets.class_picker(
            names, "internals_rows", default=busiest,
            many_label=f"Classes to show (type a name to search the {n_classes:,}; a heatmap of every class "
                       "would be unreadable)",
        )
        if not rows:
            st.info("Pick at least one class above to see its row of P and M.")
    normalise = st.toggle("Show each class's counts as a share of its embeddings", value=True, key="internals_norm",
                          help="P[c, k] / (number of embeddings of class c seen): comparable across classes")
    z = freq[rows]
    if normalise:
        seen = np.maximum(freq[rows].sum(axis=1, keepdims=True) / max(das.topk, 1), 1.0)
        z = z / seen
    st.plotly_chart(
        plots.heatmap(z, x_title="embedding dimension", y_labels=[names[c] for c in rows], marks=mask[rows],
                      mark_name=f"mask M (top-{das.topk})", height=max(260, 22 * len(rows) + 80),
                      colorbar_title="share" if normalise else "count"),
        width="stretch", key="internals_heatmap",
    )
    st.caption(
        "P[c, k] counts how often dimension k was among the top-K values of an embedding of class c; the red "
        "squares are the mask M[c] = the top-K of each row, the only dimensions DFS scales "
        f"(by γ ~ U[1 − r_s, 1 + r_s] = [{1 - das.r_s:g}, {1 + das.r_s:g}])."
    )
    from das_core.explorer.analysis import class_top_dims

    top = class_top_dims(das)
    seen_counts = freq.sum(axis=1) / max(das.topk, 1)
    st.dataframe(
        [
            {
                "class": names[c],
                "embeddings seen": int(seen_counts[c]),
                f"top-{das.topk} dimensions": ", ".join(str(j) for j in top[c]) or "—",
                "their counts": ", ".join(str(int(freq[c, j])) for j in top[c]) or "—",
            }
            for c in rows
        ],
        hide_index=True, width="stretch",
    )

with tab_bank:
    filled = das.bank_filled.detach().cpu().numpy()
    if not das.use_mts or filled.sum() == 0:
        st.info("MTS was off: the banks are empty.")
    fill_rows = rows if many else list(range(n_classes))
    if many:
        full, empty = int((filled >= das.bank_size).sum()), int((filled == 0).sum())
        st.caption(f"Banks of all {n_classes:,} classes: {full:,} full, {empty:,} empty, "
                   f"{n_classes - full - empty:,} partly filled (median {int(np.median(filled))} of "
                   f"Z = {das.bank_size}). The bars show the classes picked on the first tab.")
    st.plotly_chart(
        plots.bars([names[c] for c in fill_rows], (filled[fill_rows] / das.bank_size).tolist(),
                   y_title=f"bank filled (of Z = {das.bank_size})",
                   colours=[plots.class_colour(j if many else c) for j, c in enumerate(fill_rows)]),
        width="stretch", key="internals_fill",
    )
    cls = st.selectbox("Class" + (f" (type a name to search the {n_classes:,})" if many else ""),
                       list(range(n_classes)), format_func=lambda c: names[c], key="internals_class")
    from das_core.explorer.analysis import bank_summary

    bank = bank_summary(das, int(cls))
    if bank["filled"] == 0:
        st.info(f"The bank of {names[cls]} is empty: DAS shifts its embeddings by b = 0.")
    else:
        t = bank["transformations"]
        st.plotly_chart(
            plots.heatmap(t, x_title="embedding dimension",
                          y_labels=[f"t{i + 1}{' (newest)' if i == len(t) - 1 else ''}" for i in range(len(t))],
                          colorscale="RdBu", zmid=0.0, height=max(220, 26 * len(t) + 80), colorbar_title="value"),
            width="stretch", key="internals_bank",
        )
        st.plotly_chart(
            plots.bars([f"t{i + 1}" for i in range(len(t))], bank["norms"].tolist(), y_title="‖t‖",
                       colours=[plots.class_colour(int(cls)) if not many else plots.many_colour(int(cls))] * len(t)),
            width="stretch", key="internals_norms",
        )
        st.caption(
            f"{bank['filled']} of {bank['size']} memorised differences v_i − v_j of two {names[cls]} embeddings "
            f"(oldest first; mean norm {bank['mean_norm']:.3f}). DAS shifts a {names[cls]} embedding by r_b · t "
            "with t drawn uniformly from these rows."
        )

with tab_preview:
    st.caption("Every memorised transformation t of the anchor's class applied to one anchor: v + r_b · t "
               "(normalised like produced embeddings), placed into the training split's map.")
    with widgets.guard("Embedding the training split"):
        es = state.embedding_set(ckpt, "train")
    with widgets.guard("Fitting the map"):
        mp = state.umap_map(ckpt, es)
    c1, c2, c3 = st.columns(3)
    p_cls = c1.selectbox("Anchor class" + (" (type to search)" if many else ""), list(range(n_classes)),
                         format_func=lambda c: names[c], key="internals_pcls")
    members = np.flatnonzero(es.labels == p_cls)
    pick = int(c2.number_input(f"Anchor (0..{len(members) - 1} within the class)", 0, max(0, len(members) - 1), 0,
                               key="internals_anchor"))
    lo, hi, value = R_B.slider(das.r_b)  # das_core.training.ranges: one rule for r_b
    r_b = c3.slider("r_b", lo, hi, value, R_B.ui_step, format="%.3f", key="internals_rb")
    anchor = int(members[pick])
    from das_core.explorer.analysis import preview_shifts

    points = preview_shifts(das, es.embeddings[anchor], int(p_cls), r_b)
    if len(points) == 0:
        st.info("This class's bank is empty: no shift to preview.")
    else:
        try:
            thumbs = state.sprites(ckpt, "train")
        except Exception:
            thumbs = None
        enable_hover_thumbnails()
        xy = state.placer(ckpt, es, mp)(points)
        anchors_xy = np.repeat(mp.coords[[anchor]], len(points), axis=0)
        fig = plots.embedding_map(
            mp.coords, es.labels, es.class_names, np.arange(len(es)),
            produced=(xy, np.full(len(points), p_cls), np.full(len(points), anchor), np.arange(1, len(points) + 1)),
            anchor_coords=anchors_xy, highlight=(mp.coords[[anchor]], f"anchor #{anchor}"), thumbs=thumbs,
            uirevision=f"internals-{ckpt.path}", point_size=3, highlight_classes=[int(p_cls)],
        )
        st.plotly_chart(fig, width="stretch", key="internals_preview")
        shift = np.linalg.norm(points - es.embeddings[anchor], axis=1)
        st.caption(f"{len(points)} shifted copies of anchor #{anchor}; their distance to the anchor in the "
                   f"embedding space: {shift.min():.4f} to {shift.max():.4f} (median {np.median(shift):.4f}).")
