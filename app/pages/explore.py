"""Explore: the embedding space of a checkpoint (UMAP), with the embeddings DAS produces placed
into the same map, live under the r_s / r_b sliders, and numbers that say how much of the
space between real points they fill and how honest their placement is."""

from __future__ import annotations

import io

import numpy as np
import streamlit as st

from app import plots, state, widgets
from app.hover import enable_hover_thumbnails
from app.produced_layer import show_produced
from das_core.training.ranges import R_B, R_S, K, T

st.title("Explore")
st.caption(
    "The embedding space of a checkpoint, mapped to 2-D with UMAP, and the embeddings that "
    "Densely-Anchored Sampling produces around real ones (×), placed into the same map."
)

ckpt = widgets.checkpoint_picker(external=True)
st.caption(widgets.checkpoint_caption(ckpt))
with widgets.guard("Loading the dataset"):
    split = widgets.split_picker(ckpt)
with widgets.guard(f"Embedding the {split} split"):
    es = state.embedding_set(ckpt, split)
with widgets.guard("Fitting the map"):
    mp = state.umap_map(ckpt, es)
try:
    thumbs = state.sprites(ckpt, split)
except Exception as exc:  # thumbnails are a convenience: the map works without them
    thumbs = None
    st.info(f"Hover thumbnails are unavailable ({type(exc).__name__}: {exc}).")
enable_hover_thumbnails()

cfg = ckpt.config
das, das_note = state.das_for_split(ckpt, es)
st.sidebar.divider()
st.sidebar.markdown("**DAS controls**")
with st.sidebar:
    # ranges: das_core.training.ranges (the config's and the DAS module's too); a checkpoint's
    # own value outside a slider's usual range widens it
    lo, hi, value = R_S.slider(cfg.das_r_s)
    r_s = st.slider("r_s (scale range)", lo, hi, value, R_S.ui_step, format="%.3f", key="r_s",
                    help="γ ~ U[1 − r_s, 1 + r_s] on the class's top-K dimensions")
    lo, hi, value = R_B.slider(cfg.das_r_b)
    r_b = st.slider("r_b (shift ratio)", lo, hi, value, R_B.ui_step, format="%.3f", key="r_b",
                    help="b = r_b · t, t a memorised same-class difference from the class bank")
    c1, c2 = st.columns(2)
    lo, hi, value = T.slider(cfg.das_num_produce)
    rounds = c1.number_input("T (rounds)", int(lo), int(hi), int(value), key="T")
    topk = c2.number_input("K (mask size)", 1, int(min(K.high, es.dim)), int(min(cfg.das_topk, es.dim)), key="K")
    c3, c4 = st.columns(2)
    dfs_on, mts_on = cfg.das_halves()
    use_dfs = c3.toggle("DFS", value=dfs_on, key="dfs", help="discriminative feature scaling")
    use_mts = c4.toggle("MTS", value=mts_on, key="mts", help="memorized transformation shifting")
    per_class = st.slider("Anchors per class", 0, 500, 50, 5, key="anchors_per_class",
                          help="real points DAS produces from (a seeded, stratified sample)")
    seed = st.number_input("Seed", 0, 10_000, 0, key="produce_seed")

names = es.class_names
many = plots.is_many(len(names))
classes = widgets.class_picker(
    names, "classes", default=widgets.largest_classes(es.labels, 5) if many else range(len(names)),
    many_label=f"Classes to highlight and produce from (type a name to search the {len(names):,})",
)
if many:
    st.caption(f"{len(names):,} classes: every real point is drawn, coloured by class (hover a point for its "
               f"class), without a legend; the classes picked above (at most {plots.MAX_LEGEND_CLASSES}) are "
               "highlighted with a legend entry each, and DAS produces from them only.")
st.caption(das_note)


@st.fragment
def produce_and_draw() -> None:
    from das_core.explorer.analysis import gap_fill, produce_for_anchors, produced_honesty, select_anchors

    with widgets.guard("Producing"):
        keep = np.ones(len(es), dtype=bool) if many else np.isin(es.labels, classes)
        anchors = select_anchors(es.labels, per_class, classes=classes, seed=int(seed))
        produced, p_lab, p_anchor, p_round = produce_for_anchors(
            das, es.embeddings, es.labels, anchors, r_s=r_s, r_b=r_b, rounds=int(rounds), topk=int(topk),
            use_dfs=use_dfs, use_mts=use_mts, seed=int(seed),
        )
        # float32, as the browser gets them (app.produced_layer): it compares what the map holds with them
        p_xy = (state.placer(ckpt, es, mp)(produced) if len(produced) else np.zeros((0, 2))).astype(np.float32)
    ids = np.flatnonzero(keep)
    show_links = st.toggle("Link produced points to their anchors", value=True, key="links")
    # The figure holds the real points and a trace per class DAS produces from, with the points
    # produced when this session first drew it; it does not change when the sliders move, so the
    # browser's message cache spares re-sending it, and the produced points of later moves travel
    # on their own (app.produced_layer fills the traces in).
    now = (p_xy, p_lab, p_anchor, p_round) if len(produced) else None
    fig, slots = state.explore_figure(ckpt, es, mp, classes, show_links=show_links, thumbs=thumbs, produced=now)
    which = (f"all {len(names):,} classes, {len(classes)} highlighted" if many
             else f"all of the {len(classes)} chosen classes; {len(es):,} in the split")
    st.caption(
        f"Drawing **{int(keep.sum()):,}** real points ({which}) and **{len(produced):,}** produced points "
        f"({len(anchors):,} anchors × T={int(rounds)}). Hover a point for its image; box/lasso-select to see "
        "and export images."
    )
    event = st.plotly_chart(fig, key="explore_map", on_select="rerun", selection_mode=("points", "box", "lasso"),
                            width="stretch")
    show_produced("explore_map", slots, now)
    from app.downloads import export_buttons

    export_buttons(ckpt, es, split, ids, mp.coords, (produced, p_lab, p_anchor, p_xy), {
        "r_s": r_s, "r_b": r_b, "T": int(rounds), "K": int(topk), "dfs": use_dfs, "mts": use_mts, "map": mp.method})

    if len(produced):
        with widgets.guard("Measuring the produced points"):
            gap = gap_fill(es.embeddings, es.labels, produced, p_lab, anchors=anchors,
                           reference=state.gap_reference(ckpt, es, anchors))
            hon = produced_honesty(es.embeddings, es.labels, produced, p_lab, produced_from=p_anchor,
                                   anchors=anchors)
        m1, m2, m3 = st.columns(3)
        m1.metric("Gap fill", f"{100 * gap['overall']:.1f} %",
                  help="How much closer the produced points come to the midpoints between each anchor and its "
                       "nearest same-class neighbour than the real points already are (0 % = no closer).")
        base = hon.get("anchors", {}).get("fraction_own_closer", float("nan"))
        m2.metric("Produced nearer their own class", f"{100 * hon['fraction_own_closer']:.1f} %",
                  delta=f"{100 * (hon['fraction_own_closer'] - base):+.1f} pts vs their anchors" if base == base else None,
                  help="Measured in the original embedding space, not on the map: the share of produced points "
                       "whose nearest real point of their own class is closer than any real point of another class.")
        m3.metric("Median own/other distance", f"{hon['median_ratio']:.3f}",
                  help="Median over produced points of (distance to own class) / (distance to nearest other "
                       "class); below 1 is on the right side.")
        st.caption(
            "The map places produced points at the weighted mean of their nearest real neighbours (what "
            "UMAP.transform starts from), which pulls them onto existing clusters: trust the two numbers on the "
            "right (original space) over their position, or fit real and produced points jointly below."
        )
        with st.expander("Per class"):
            rows = [
                {
                    "class": names[c],
                    "gap fill %": round(100 * gap["per_class"].get(c, float("nan")), 2),
                    "produced nearer own class %": round(100 * hon["per_class"].get(c, {}).get("fraction_own_closer", float("nan")), 2),
                    "median own/other": round(hon["per_class"].get(c, {}).get("median_ratio", float("nan")), 4),
                }
                for c in classes
            ]
            st.dataframe(rows, hide_index=True, width="stretch")
        if st.button("Honest view: fit UMAP on real + produced together", key="joint_fit"):
            with widgets.guard("Joint fit"), st.spinner("Fitting one UMAP on real and produced points…"):
                from das_core.explorer.umap_fit import joint_map

                real_xy, prod_xy = joint_map(es.embeddings[keep], produced, labels=es.labels[keep], seed=int(seed))
            pos = {int(g): i for i, g in enumerate(ids)}
            anchor_rows = np.array([pos.get(int(a), -1) for a in p_anchor])
            fig2 = plots.embedding_map(
                real_xy, es.labels[keep], names, ids, produced=(prod_xy, p_lab, p_anchor, p_round),
                highlight_classes=classes,
                anchor_coords=real_xy[anchor_rows] if (anchor_rows >= 0).all() else None,
                show_links=show_links, thumbs=thumbs, uirevision="joint", title="Joint fit (real + produced)",
            )
            st.plotly_chart(fig2, key="joint_map", width="stretch")
    elif das is None:
        st.info("No DAS state: nothing to produce.")
    elif not (use_dfs or use_mts):
        st.info("DFS and MTS are both off: DAS has nothing to produce (turn one of them on).")
    elif per_class == 0:
        st.info("Anchors per class is 0: nothing to produce.")

    selected_real = []
    selected_produced = 0
    sel = event.selection if event and event.selection else None
    for p in (sel.points if sel else []):
        cd = plots.point_customdata(p)
        if not cd:
            continue
        if len(cd) == 1:
            selected_real.append(int(cd[0]))
        else:
            selected_produced += 1
    regions = (list(sel.get("box") or []), list(sel.get("lasso") or [])) if sel else ([], [])
    if any(regions):
        # The selection stays drawn while the sliders move the produced points; the points the
        # browser reported belong to the moment it was drawn, so count the current ones inside.
        from das_core.explorer.selection import in_regions

        selected_produced = int(in_regions(p_xy, *regions).sum())
    if selected_real or selected_produced:
        show_selection(sorted(set(selected_real)), selected_produced)


def show_selection(sel: list[int], n_produced: int) -> None:
    st.subheader(f"Selection: {len(sel):,} real points" + (f" (+ {n_produced} produced)" if n_produced else ""))
    rows = np.asarray(sel, dtype=np.int64)
    csv = io.StringIO()
    csv.write("index,label,class,x,y\n")
    for i in rows:
        csv.write(f"{i},{int(es.labels[i])},\"{es.class_names[int(es.labels[i])]}\",{mp.coords[i, 0]:.5f},{mp.coords[i, 1]:.5f}\n")
    st.download_button("Export selection (CSV)", csv.getvalue(), file_name=f"selection-{split}.csv",
                       mime="text/csv", key="export_selection")
    limit = 60
    dataset = state.splits(ckpt).get(split)
    shown = rows[:limit]
    if len(rows) > limit:
        st.caption(f"Showing the first {limit} of {len(rows):,} selected images (the CSV has all).")
    cols = st.columns(10)
    for j, i in enumerate(shown):
        with widgets.guard("Loading an image"):
            img = state.display_image(dataset, int(i))
        cols[j % 10].image(img, caption=f"#{i} {es.class_names[int(es.labels[i])]}", width="stretch")


produce_and_draw()
st.caption(f"Map: {mp.method}. Seed {mp.seed}; umap-learn {mp.versions.get('umap-learn', '?')}; "
           f"cached on disk and reused.")
