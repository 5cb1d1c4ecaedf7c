"""Plotly figure builders: rendering only, no computation of what is drawn."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

# A qualitative palette long enough for 20 classes, then repeating with other symbols.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#e6550d", "#31a354", "#756bb1", "#636363", "#ad494a",
    "#8ca252", "#bd9e39", "#7b4173", "#3182bd",
)


# Up to this many classes, a map draws one trace (and legend entry) per class; beyond it, every
# class's points share one WebGL trace with a colour per point and the class in the hover label,
# and only the classes picked for highlighting get traces and legend entries.
MAX_LEGEND_CLASSES = len(PALETTE)


def class_colour(c: int) -> str:
    return PALETTE[int(c) % len(PALETTE)]


def many_colour(c: int) -> str:
    """A colour for class ``c`` of many: hues spaced by the golden angle, so that classes with
    nearby ids (often related) get far-apart hues, with no palette to run out of."""
    return f"hsl({(int(c) * 137.508) % 360:.1f},60%,{45 + 12 * (int(c) % 3)}%)"


def is_many(n_classes: int) -> bool:
    return n_classes > MAX_LEGEND_CLASSES


# The ``meta`` of a map's produced-point traces, by which the browser finds the traces to fill in.
LINKS_SLOT = "produced-links"


def produced_slot(c: int) -> str:
    """The ``meta`` of the trace of the points produced from class ``c``."""
    return f"produced-{int(c)}"


def _base_layout(fig: go.Figure, *, height: int, uirevision: str, thumbs: dict[str, Any] | None) -> go.Figure:
    fig.update_layout(
        height=height,
        margin={"l": 0, "r": 0, "t": 30, "b": 0},
        legend={"itemsizing": "constant", "orientation": "v"},
        uirevision=uirevision,  # keep zoom and legend state when the sliders re-produce
        dragmode="lasso",
        xaxis={"showticklabels": False, "zeroline": False, "title": None},
        yaxis={"showticklabels": False, "zeroline": False, "title": None, "scaleanchor": "x"},
        plot_bgcolor="#fafafa",
        hovermode="closest",
    )
    if thumbs is not None:
        fig.update_layout(meta={"thumbs": thumbs})
    return fig


def point_customdata(point: dict[str, Any]) -> list[int] | None:
    """A selected point's ``customdata`` as a list of ints, or None when it has none.

    Rows of 2-D customdata come back from the browser in whatever form plotly.js holds them:
    a list, a scalar, or (numpy arrays are sent binary, as typed arrays) a JSON object keyed
    "0", "1", ..."""
    cd = point.get("customdata")
    if cd is None:
        return None
    if isinstance(cd, dict):
        return [int(cd[k]) for k in sorted(cd, key=int)]
    if isinstance(cd, (list, tuple)):
        return [int(v) for v in cd]
    return [int(cd)]


def embedding_map(
    coords: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    ids: np.ndarray,
    *,
    produced: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
    anchor_coords: np.ndarray | None = None,
    show_links: bool = True,
    highlight: tuple[np.ndarray, str] | None = None,
    thumbs: dict[str, Any] | None = None,
    uirevision: str = "map",
    height: int = 640,
    title: str | None = None,
    point_size: float = 4.0,
    highlight_classes: Sequence[int] | None = None,
    produced_slots: Sequence[int] | None = None,
) -> go.Figure:
    """Real points (one WebGL trace per class, ``customdata = [index in split]``), produced
    points ``(coords, labels, anchor ids, round)`` with their own marker and optional links to
    their anchors (``anchor_coords`` row-aligned with the produced points), and an optional
    highlighted point set (``(coords, label)``, e.g. a query).

    With more than ``MAX_LEGEND_CLASSES`` classes, the real points form one trace ("all
    classes", a colour per class, the class name in each point's hover label, no legend entry)
    and only ``highlight_classes`` get a trace and legend entry of their own, drawn on top.

    ``produced_slots``: the classes DAS may produce from, each given a produced trace (``meta``
    :func:`produced_slot`, plus :data:`LINKS_SLOT` for the links when ``show_links``), holding the
    points of ``produced`` from that class (none without ``produced``), that the browser fills in
    anew when only the produced points change (``app.produced_layer``), so that the figure, and
    what is sent for it, stays the same."""
    fig = go.Figure()
    present = np.unique(labels)
    many = is_many(len(present))
    if many:
        _all_classes_trace(fig, coords, labels, class_names, ids, point_size, highlight_classes or ())
        in_split = set(present.tolist())
        drawn = [int(c) for c in (highlight_classes or ()) if int(c) in in_split]
    else:
        drawn = [int(c) for c in present]
    for c in drawn:
        sel = labels == c
        fig.add_trace(
            go.Scattergl(
                x=coords[sel, 0],
                y=coords[sel, 1],
                mode="markers",
                name=str(class_names[int(c)]),
                legendgroup=f"c{int(c)}",
                marker={
                    "size": point_size + (2 if many else 0), "color": class_colour(drawn.index(c) if many else c),
                    "opacity": 0.9 if many else 0.75,
                    **({"line": {"width": 0.5, "color": "black"}} if many else {}),
                },
                customdata=ids[sel].reshape(-1, 1),
                hovertemplate="%{fullData.name} · #%{customdata[0]}<extra></extra>",
            )
        )
    slots: list[int] | None = None
    if produced_slots is not None:
        slots = sorted({int(c) for c in produced_slots})
        if many and len(slots) > MAX_LEGEND_CLASSES:
            raise ValueError(f"at most {MAX_LEGEND_CLASSES} produced classes can have slots of their own, "
                             f"not {len(slots)}")
        if produced is None:
            empty = np.zeros(0, dtype=np.int64)
            produced = (np.zeros((0, 2), np.float32), empty, empty, empty)
        stray = set(np.unique(produced[1]).tolist()) - set(slots)
        if stray:
            raise ValueError(f"points produced from classes without a slot: {sorted(stray)}")
    if produced is not None:
        p_xy, p_lab, p_anchor, p_round = produced
        if show_links and (slots is not None or (anchor_coords is not None and len(p_xy))):
            n = len(p_xy)
            # float32 like the points they join; class by class, in the order of the produced
            # traces (the order app.produced_layer writes them in when the points change)
            lx = np.empty(3 * n, dtype=np.float32)
            ly = np.empty(3 * n, dtype=np.float32)
            if n:
                if anchor_coords is None:
                    raise ValueError("links to the anchors need anchor_coords (or show_links=False)")
                order = np.argsort(p_lab, kind="stable")
                lx[0::3], lx[1::3], lx[2::3] = anchor_coords[order, 0], p_xy[order, 0], np.nan
                ly[0::3], ly[1::3], ly[2::3] = anchor_coords[order, 1], p_xy[order, 1], np.nan
            fig.add_trace(
                go.Scattergl(
                    x=lx, y=ly, mode="lines", name="anchor → produced", hoverinfo="skip", meta=LINKS_SLOT,
                    line={"width": 0.6, "color": "rgba(60,60,60,0.35)"},
                )
            )
        p_classes = slots if slots is not None else [int(c) for c in np.unique(p_lab)]
        if many and len(p_classes) > MAX_LEGEND_CLASSES:  # one trace, the class in the hover label
            fig.add_trace(
                go.Scattergl(
                    x=p_xy[:, 0], y=p_xy[:, 1], mode="markers", name="produced", showlegend=False,
                    marker={"size": point_size + 4, "symbol": "x-thin-open",
                            "line": {"width": 1.5, "color": [many_colour(int(c)) for c in p_lab]}},
                    text=[f"produced · {class_names[int(c)]}" for c in p_lab],
                    customdata=np.stack([p_anchor, p_round], axis=1),
                    hovertemplate="produced, round %{customdata[1]} · anchor #%{customdata[0]}<extra>%{text}</extra>",
                )
            )
            p_classes = []
        for c in p_classes:
            sel = p_lab == c
            if not many:
                colour = class_colour(c)
            else:
                colour = class_colour(drawn.index(c)) if c in drawn else many_colour(c)
            fig.add_trace(
                go.Scattergl(
                    x=p_xy[sel, 0],
                    y=p_xy[sel, 1],
                    mode="markers",
                    name=f"produced · {class_names[c]}",
                    legendgroup=f"c{c}",
                    meta=produced_slot(c),
                    marker={
                        "size": point_size + 4,
                        "color": colour,
                        "symbol": "x-thin-open",
                        "line": {"width": 1.5, "color": colour},
                    },
                    customdata=np.stack([p_anchor[sel], p_round[sel]], axis=1),
                    hovertemplate=(
                        "produced, round %{customdata[1]} · anchor #%{customdata[0]}<extra>%{fullData.name}</extra>"
                    ),
                )
            )
    if highlight is not None:
        h_xy, h_name = highlight
        fig.add_trace(
            go.Scatter(
                x=h_xy[:, 0], y=h_xy[:, 1], mode="markers", name=h_name,
                marker={"size": 18, "symbol": "star", "color": "gold", "line": {"width": 1.5, "color": "black"}},
                hovertemplate=f"{h_name}<extra></extra>",
            )
        )
    if title:
        fig.update_layout(title={"text": title, "font": {"size": 14}})
    return _base_layout(fig, height=height, uirevision=uirevision, thumbs=thumbs)


def _all_classes_trace(fig: go.Figure, coords: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                       ids: np.ndarray, point_size: float, highlighted: Sequence[int]) -> None:
    """Every real point in one WebGL trace: per-point colours, the class name as hover text."""
    uniq, inverse = np.unique(labels, return_inverse=True)
    colours = np.array([many_colour(int(c)) for c in uniq], dtype=object)[inverse]
    names = np.array([str(class_names[int(c)]) for c in uniq], dtype=object)[inverse]
    fig.add_trace(
        go.Scattergl(
            x=coords[:, 0],
            y=coords[:, 1],
            mode="markers",
            name=f"all {len(uniq)} classes",
            showlegend=False,
            marker={"size": point_size, "color": colours.tolist(), "opacity": 0.35 if len(highlighted) else 0.7},
            text=names.tolist(),
            customdata=ids.reshape(-1, 1),
            hovertemplate="%{text} · #%{customdata[0]}<extra></extra>",
        )
    )


def heatmap(
    z: np.ndarray,
    *,
    x_title: str,
    y_labels: Sequence[str],
    colorscale: str = "Viridis",
    marks: np.ndarray | None = None,
    mark_name: str = "mask",
    height: int = 360,
    zmid: float | None = None,
    colorbar_title: str = "",
) -> go.Figure:
    """A heatmap (rows = ``y_labels``) with optional marked cells (bool array of z's shape)."""
    fig = go.Figure(
        go.Heatmap(
            z=z, y=list(y_labels), colorscale=colorscale, zmid=zmid,
            colorbar={"title": colorbar_title},
            hovertemplate="%{y} · dim %{x}: %{z}<extra></extra>",
        )
    )
    if marks is not None and marks.any():
        r, c = np.nonzero(marks)
        fig.add_trace(
            go.Scatter(
                x=c, y=[y_labels[i] for i in r], mode="markers", name=mark_name,
                marker={"symbol": "square-open", "size": 9, "color": "red", "line": {"width": 2}},
                hovertemplate="%{y} · dim %{x} (in the mask)<extra></extra>",
            )
        )
    fig.update_layout(
        height=height, margin={"l": 0, "r": 0, "t": 10, "b": 0}, xaxis_title=x_title,
        legend={"orientation": "h", "y": 1.08},
    )
    return fig


def curves(series: dict[str, tuple[Sequence[float], Sequence[float]]], *, y_title: str, height: int = 320,
           percent: bool = False) -> go.Figure:
    """Line chart of named ``(x, y)`` series (epochs on x)."""
    fig = go.Figure()
    for name, (x, y) in series.items():
        ys = [100 * v for v in y] if percent else list(y)
        fig.add_trace(go.Scatter(x=list(x), y=ys, mode="lines+markers", name=name))
    fig.update_layout(
        height=height, margin={"l": 0, "r": 0, "t": 30, "b": 0}, xaxis_title="epoch",
        yaxis_title=y_title + (" (%)" if percent else ""),
        # above the plot: below it, a horizontal legend covers the x-axis title
        legend={"orientation": "h", "x": 0, "y": 1.02, "yanchor": "bottom"},
    )
    return fig


def bars(names: Sequence[str], values: Sequence[float], *, y_title: str, height: int = 260,
         colours: Sequence[str] | None = None) -> go.Figure:
    fig = go.Figure(go.Bar(x=list(names), y=list(values), marker_color=list(colours) if colours else None))
    fig.update_layout(height=height, margin={"l": 0, "r": 0, "t": 10, "b": 0}, yaxis_title=y_title)
    return fig
