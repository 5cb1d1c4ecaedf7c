"""The training-timeline animation: rendering only (the maps come from das_core.explorer.timeline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.plots import class_colour, is_many, many_colour


def _traces(coords: np.ndarray, labels: np.ndarray, ids: np.ndarray, class_names: Sequence[str], col: int,
            show_legend: bool) -> list[go.Scatter]:
    classes = np.unique(labels)
    axes = {"xaxis": "x" if col == 1 else f"x{col}", "yaxis": "y" if col == 1 else f"y{col}"}
    if is_many(len(class_names)):
        return [go.Scatter(x=coords[:, 0], y=coords[:, 1], mode="markers", name="probe images",
                           marker={"size": 4, "color": [many_colour(c) for c in labels]},
                           text=[class_names[c] for c in labels], customdata=ids.reshape(-1, 1),
                           hovertemplate="%{text} · #%{customdata[0]}<extra></extra>", showlegend=False,
                           **axes)]
    out = []
    for c in classes:
        m = labels == c
        out.append(go.Scatter(x=coords[m, 0], y=coords[m, 1], mode="markers", name=class_names[c],
                              legendgroup=str(c), showlegend=show_legend,
                              marker={"size": 4, "color": class_colour(int(c))},
                              customdata=ids[m].reshape(-1, 1),
                              hovertemplate=f"{class_names[c]} · #%{{customdata[0]}}<extra></extra>", **axes))
    return out


def _range(coords: np.ndarray, axis: int) -> list[float]:
    lo, hi = float(coords[..., axis].min()), float(coords[..., axis].max())
    pad = 0.05 * (hi - lo or 1.0)
    return [lo - pad, hi + pad]


def timeline_animation(panels: Sequence[tuple[str, np.ndarray]], rows: Sequence[np.ndarray], epochs: np.ndarray,
                       labels: np.ndarray, class_names: Sequence[str], ids: np.ndarray, *,
                       thumbs: dict[str, Any] | None = None, height: int = 560) -> go.Figure:
    """Side-by-side maps played over ``epochs``: ``panels`` are ``(title, coords (F_i, n, 2))``;
    frame ``k`` shows ``coords[rows[i][k]]`` of panel ``i``. One Plotly frame per epoch, a
    slider to step and a play button; each panel's axes are fixed to its points over all frames.

    Every point (in the first data and in every frame, which replace it) carries
    ``customdata[0] = ids[j]``, the probe image's index in its split, and ``thumbs`` (the
    sprite geometry of that split, ``das_core.explorer.thumbs``) goes to ``layout.meta.thumbs``
    for the hover thumbnails (``app.hover``)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.shape != labels.shape:
        raise ValueError(f"ids must have one index per probe image ({labels.shape[0]}), got shape {ids.shape}")
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for t, _ in panels],
                        horizontal_spacing=0.04)

    def frame_data(k: int) -> list[go.Scatter]:
        data: list[go.Scatter] = []
        for i, (_, coords) in enumerate(panels):
            data += _traces(coords[rows[i][k]], labels, ids, class_names, i + 1, show_legend=i == 0)
        return data

    for trace in frame_data(0):
        fig.add_trace(trace)
    names = [str(int(e)) for e in epochs]
    fig.frames = [go.Frame(data=frame_data(k), name=names[k]) for k in range(len(names))]
    for i, (_, coords) in enumerate(panels):
        suffix = "" if i == 0 else str(i + 1)
        fig.layout[f"xaxis{suffix}"].update(range=_range(coords, 0), showticklabels=False, zeroline=False)
        fig.layout[f"yaxis{suffix}"].update(range=_range(coords, 1), showticklabels=False, zeroline=False)
    anim: dict[str, Any] = {"mode": "immediate", "transition": {"duration": 300},
                            "frame": {"duration": 600, "redraw": False}}
    if thumbs is not None:
        fig.update_layout(meta={"thumbs": thumbs})
    fig.update_layout(
        height=height,
        margin={"l": 0, "r": 0, "t": 40, "b": 0},
        plot_bgcolor="#fafafa",
        legend={"itemsizing": "constant"},
        updatemenus=[{
            "type": "buttons", "direction": "left", "showactive": False, "x": 0.0, "y": -0.06,
            "xanchor": "left", "yanchor": "top", "pad": {"r": 10, "t": 10},
            "buttons": [
                {"label": "▶ Play", "method": "animate", "args": [None, {**anim, "fromcurrent": True}]},
                {"label": "❚❚ Pause", "method": "animate",
                 "args": [[None], {"mode": "immediate", "frame": {"duration": 0, "redraw": False},
                                   "transition": {"duration": 0}}]},
            ],
        }],
        sliders=[{
            "active": 0, "x": 0.16, "len": 0.84, "y": -0.02, "yanchor": "top", "pad": {"t": 30},
            "currentvalue": {"prefix": "epoch ", "visible": True, "xanchor": "left"},
            "steps": [{"label": n, "method": "animate",
                       "args": [[n], {"mode": "immediate", "frame": {"duration": 0, "redraw": False},
                                      "transition": {"duration": 0}}]} for n in names],
        }],
    )
    return fig
