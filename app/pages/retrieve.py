"""Retrieve: one query image (from the gallery, a sample, or an upload) against the gallery of a
split, embedded exactly as the checkpoint was trained, answered by the cached faiss index, with
right/wrong marks and per-query recall, on the map, and side by side for a second checkpoint
(the paper's qualitative figure: the demo with and without DAS)."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from PIL import ImageOps

from app import plots, state, widgets
from app.hover import enable_hover_thumbnails
from das_core.data.images import MAX_UPLOAD_BYTES, ImageError, open_image, thumbnail
from das_core.explorer import compare
from das_core.retrieval import query

RIGHT, WRONG, UNKNOWN = "#2ca02c", "#d62728", "#bbbbbb"
PER_ROW = 10

st.title("Retrieve")
st.caption(
    "Query the gallery of a split with one image: it is prepared exactly as the checkpoint's training "
    "images were, embedded, and its nearest gallery images are found in the split's faiss index. Right "
    "results (same class as the query) are framed green, wrong ones red."
)

ckpt = widgets.checkpoint_picker(external=True)
st.caption(widgets.checkpoint_caption(ckpt))
external = state.is_external(ckpt)  # an embeddings file: by image only when it names its model
with widgets.guard("Loading the dataset"):
    split = widgets.split_picker(ckpt, key="retrieve_split", default="test")
    dataset = state.splits(ckpt).get(split)
with st.sidebar:
    k = int(st.slider("k (results per query)", 1, 50, 8, key="retrieve_k"))
    show_map = st.toggle("Show the query on the map", value=True, key="retrieve_show_map")
with widgets.guard(f"Embedding the {split} split"):
    es = state.embedding_set(ckpt, split)
with widgets.guard("Building the retrieval index"):
    index = state.retrieval_index(ckpt, es)
names = es.class_names


# -- a second checkpoint --------------------------------------------------------------------------
def _default_second() -> str | None:
    """The other demo of the pair for a demo (DAS vs baseline on the same dataset), else the
    first other checkpoint."""
    from das_core.store.demo import demo_partner

    choices = state.checkpoint_choices()
    others = [c for c in choices if c.path != str(ckpt.path)]
    is_demo = any(c.path == str(ckpt.path) and c.kind == "demo" for c in choices)
    partner = demo_partner(ckpt.path) if is_demo else None
    pair = [c for c in others if partner is not None and c.path == str(partner)]
    return (pair or others)[0].path if others else None


second_default = None if external else _default_second()
side = not external and st.toggle("Side by side with a second checkpoint (same query, two result rows)",
                                  value=second_default is not None, key="retrieve_side")
ckpt_b = es_b = index_b = None
if side:
    if st.session_state.get("retrieve_ckpt_b") is None and second_default is not None:
        st.session_state["retrieve_ckpt_b"] = second_default
    ckpt_b = widgets.checkpoint_picker(key="retrieve_ckpt_b", label="Second checkpoint", sidebar=False, upload=False)
    st.caption(widgets.checkpoint_caption(ckpt_b))
    reason = compare.comparable(ckpt.config, ckpt_b.config, split)
    if reason is None:
        with widgets.guard("Loading the second checkpoint's dataset"):
            if split not in state.splits(ckpt_b).available():
                reason = f"the second checkpoint has no {split} split"
    if reason is not None:
        st.warning(f"The second checkpoint is left out: {reason}.")
        ckpt_b = None
    else:
        with widgets.guard(f"Embedding the {split} split with the second checkpoint"):
            es_b = state.embedding_set(ckpt_b, split)
            index_b = state.retrieval_index(ckpt_b, es_b)

# -- the query ------------------------------------------------------------------------------------
st.subheader("Query")
SOURCES = {"gallery": "an image of the split", "sample": "a sample image", "upload": "an upload"}
if external and not getattr(ckpt, "checkpoint", None):
    SOURCES = {"gallery": "an item of the file"}
    st.caption("This embeddings file names no model checkpoint, so only its own items can be queries (save a "
               "`checkpoint` entry in the file to query by image).")
    st.session_state["retrieve_source"] = "gallery"
q_col, c_col = st.columns([1, 4])
with c_col:
    source = st.radio("Query with", list(SOURCES), format_func=SOURCES.__getitem__, horizontal=True,
                      key="retrieve_source")
    query_img: Any = None
    q_index: int | None = None  # gallery index of the query (its embedding is the cached one)
    query_label: int | None = None
    exclude: int | None = None
    origin = ""
    if source == "gallery":
        n = len(es)
        if not 0 <= int(st.session_state.get("retrieve_index", 0)) < n:
            st.session_state["retrieve_index"] = 0

        def _random_index() -> None:
            st.session_state["retrieve_index"] = int(np.random.default_rng().integers(n))

        a, b = st.columns([3, 1], vertical_alignment="bottom")
        q_index = int(a.number_input(f"Index in the {split} split (0 – {n - 1:,})", 0, n - 1, key="retrieve_index"))
        b.button("🎲 Random", key="retrieve_random", on_click=_random_index, width="stretch")
        query_label = int(es.labels[q_index])
        exclude = q_index
        with widgets.guard("Loading the image"):
            query_img = dataset.load_image(q_index)
        q_style = dataset.style_of(q_index)
        origin = (f"#{q_index} of the {split} split · {names[query_label]}"
                  f"{f' · style {q_style}' if q_style else ''} (left out of its own results)")
    elif source == "sample":
        samples = query.sample_queries(state.QUERY_SAMPLES, names)
        if not samples:
            st.warning(f"No sample images in `{state.QUERY_SAMPLES}`.")
            st.stop()
        by_name = {s.name: s for s in samples}
        pick = st.selectbox("Sample", list(by_name), key="retrieve_sample")
        sample = by_name[pick]
        try:
            query_img = open_image(sample.path.read_bytes(), max_bytes=MAX_UPLOAD_BYTES, name=sample.name)
        except (ImageError, OSError) as exc:
            st.error(f"The sample {sample.name} cannot be used: {exc}")
            st.stop()
        query_label = sample.label
        if query_label is None:
            origin = f"{sample.name}: its name names none of this split's classes, so results are not marked"
        else:
            origin = f"{sample.name} · {names[query_label]} (from its file name)"
            if (sample.split == split and sample.index is not None and sample.index < len(es)
                    and int(es.labels[sample.index]) == query_label):
                exclude = sample.index
                origin += f"; it is #{sample.index} of the {split} split, left out of its own results"
    else:
        up = st.file_uploader("Query image (PNG, JPEG or WebP; any size or mode)", type=["png", "jpg", "jpeg", "webp"],
                              key="retrieve_upload")
        label_opts = [-1, *range(len(names))]
        up_label = int(st.selectbox("Its class, if you know it (to mark the results; type to search)", label_opts,
                                    key="retrieve_upload_label", format_func=lambda c: "unknown" if c < 0 else names[c]))
        if up is None:
            st.info("Upload an image to query with.")
            st.stop()
        try:
            query_img = open_image(up.getvalue(), max_bytes=MAX_UPLOAD_BYTES, name=up.name)
        except ImageError as exc:
            st.error(f"This file cannot be used as a query: {exc}")
            st.stop()
        query_label = None if up_label < 0 else up_label
        w, h = query_img.size
        origin = f"{up.name} · {w}×{h} {query_img.mode}" + ("" if query_label is None else f" · {names[query_label]}")
with q_col:
    st.image(thumbnail(query_img, 160), caption=origin.split(" · ")[0] if source != "gallery" else f"#{q_index}")
st.caption(f"Query: {origin}.")


# -- retrieval ------------------------------------------------------------------------------------
def run_query(ck: Any, es_: Any, index_: Any) -> tuple[query.QueryResult, np.ndarray, float]:
    """The query's embedding under ``ck`` (the cached one for a gallery image) and its results."""
    import time

    t0 = time.perf_counter()
    if q_index is not None:
        q = es_.embeddings[q_index]
    else:
        q = query.embed_images(state.model(ck), [query_img], state.device_name())[0]
    t_embed = time.perf_counter() - t0
    return query.retrieve(index_, es_.labels, q, k, query_label=query_label, exclude=exclude), q, t_embed


entries: list[tuple[str, Any, Any, query.QueryResult, np.ndarray, float]] = []
with widgets.guard("Retrieving"):
    res, q, t_embed = run_query(ckpt, es, index)
    entries.append(("A · " + ckpt.name, ckpt, es, res, q, t_embed))
    if ckpt_b is not None:
        res_b, q_b, t_embed_b = run_query(ckpt_b, es_b, index_b)
        entries.append(("B · " + ckpt_b.name, ckpt_b, es_b, res_b, q_b, t_embed_b))
st.session_state["retrieve_results"] = [
    {"checkpoint": str(e[1].path), "indices": e[3].indices.tolist(), "distances": e[3].distances.tolist(),
     "labels": e[3].labels.tolist(), "correct": None if e[3].correct is None else e[3].correct.tolist(),
     "styles": [(dataset if e[1] is ckpt else state.splits(e[1]).get(split)).style_of(int(i)) for i in e[3].indices],
     "summary": e[3].summary()}
    for e in entries
]


def summary_line(r: query.QueryResult, t_embed: float) -> str:
    s = r.summary()
    timing = f"answered in {1e3 * (t_embed + r.seconds):.0f} ms (embedding {1e3 * t_embed:.0f} ms, search {1e3 * r.seconds:.1f} ms)"
    if s["hits"] is None:
        return f"Query class unknown: results are not marked · {timing}"
    recalls = " · ".join(f"R@{n} {'✔' if s[f'R@{n}'] else '✘'}" for n in query.RECALL_KS if f"R@{n}" in s)
    first = f"first right result at rank {s['first_hit']}" if s["first_hit"] else "no right result"
    return (f"{recalls} · P@{s['k']} {s['hits']}/{s['k']} ({100 * s['P@k']:.0f} %) · {first} · AP@{s['k']} "
            f"{s['AP@k']:.2f} · {s['relevant']:,} images of the class in the gallery · {timing}")


def framed(img: Any, colour: str) -> Any:
    return ImageOps.expand(thumbnail(img, 104).convert("RGB"), border=4, fill=colour)


for title, ck, _es, r, _, t_e in entries:
    with st.container(border=True):
        st.markdown(f"**{title}** — {widgets.checkpoint_caption(ck)}")
        st.caption(summary_line(r, t_e))
        ds = dataset if ck is ckpt else state.splits(ck).get(split)
        correct = r.correct
        for start in range(0, r.k, PER_ROW):
            cols = st.columns(PER_ROW)
            for j in range(start, min(start + PER_ROW, r.k)):
                i, d, lab = int(r.indices[j]), float(r.distances[j]), int(r.labels[j])
                ok = None if correct is None else bool(correct[j])
                colour = UNKNOWN if ok is None else (RIGHT if ok else WRONG)
                mark = "" if ok is None else ("✔ " if ok else "✘ ")
                with widgets.guard("Loading a result image"):
                    img = framed(ds.load_image(i), colour)
                style = ds.style_of(i)  # the vendor / font / ... of the hit, where the dataset records one
                cols[j - start].image(img, caption=f"{j + 1}. {mark}{names[lab]}{f' · {style}' if style else ''} · "
                                                   f"#{i} · d {d:.3f}", width="stretch")

# -- the map --------------------------------------------------------------------------------------
if show_map:
    enable_hover_thumbnails()
    map_cols = st.columns(len(entries))
    for m, (col, (title, ck, es_, r, q_emb, _)) in enumerate(zip(map_cols, entries, strict=True)):
        with col:
            with widgets.guard("Fitting the map"):
                mp = state.umap_map(ck, es_)
                xy = mp.coords[[q_index]] if q_index is not None else state.placer(ck, es_, mp)(q_emb[None, :])
            try:
                thumbs = state.sprites(ck, split)
            except Exception:  # hover thumbnails are a convenience
                thumbs = None
            fig = plots.embedding_map(
                mp.coords, es_.labels, names, np.arange(len(es_)), thumbs=thumbs,
                uirevision=f"retrieve-{ck.path}-{split}", height=480, title=title, point_size=3,
                highlight_classes=[query_label] if query_label is not None else None,
            )
            # its results, then the query, both WebGL and the query last: drawn on top of its results
            fig.add_trace(go.Scattergl(
                x=mp.coords[r.indices, 0], y=mp.coords[r.indices, 1], mode="markers", name=f"top {r.k}",
                marker={"size": 11, "symbol": "circle-open", "color": "black", "line": {"width": 1.5}},
                customdata=r.indices.reshape(-1, 1), hovertemplate="result #%{customdata[0]}<extra></extra>",
            ))
            xy = np.asarray(xy)
            fig.add_trace(go.Scattergl(
                x=xy[:, 0], y=xy[:, 1], mode="markers", name="query",
                marker={"size": 24, "symbol": "star", "color": "gold", "line": {"width": 1.5, "color": "black"}},
                hovertemplate="query<extra></extra>",
            ))
            st.plotly_chart(fig, key=f"retrieve_map_{m}", width="stretch")
    st.caption("★ the query (a gallery image sits on its own point; another image is placed among its nearest "
               "gallery neighbours, as UMAP.transform starts), ○ its results. Hover a point for its image.")
