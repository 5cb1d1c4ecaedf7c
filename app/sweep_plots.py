"""The sweep plot: the metric over two searched options (r_s, r_b), every trial marked, the best
one named. Rendering only: the points come from ``das_core.store.sweeps.trial_points``."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from das_core.explorer.sweep_view import TrialPoints

COLORSCALE = "Viridis"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def sweep_map(pts: TrialPoints, metric: str, *, height: int = 520) -> go.Figure:
    """A contour of the metric under the finished trials when they span both axes (Plotly
    interpolates between them), each trial a marker coloured by its value, failed and running
    trials as grey crosses, and the best trial a star with its name."""
    fig = go.Figure()
    xs = [d[1] for d in pts.done]
    values = [d[3] for d in pts.done]
    ys = [d[2] for d in pts.done] if pts.y is not None else values
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if pts.gridded:
        fig.add_trace(go.Contour(
            x=xs, y=ys, z=values, name=metric, colorscale=COLORSCALE, zmin=lo, zmax=hi, connectgaps=True,
            contours={"coloring": "heatmap", "showlabels": True}, line={"width": 0.5}, opacity=0.85,
            colorbar={"title": {"text": metric}}, hoverinfo="skip",
        ))
    elif pts.y is None and len(pts.done) > 1:
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        fig.add_trace(go.Scatter(x=[xs[i] for i in order], y=[values[i] for i in order], mode="lines",
                                 line={"color": "#bbb"}, name="trend", hoverinfo="skip", showlegend=False))
    y_name = pts.y or metric
    fig.add_trace(go.Scatter(
        x=xs, y=ys, mode="markers", name="trials",
        marker={"size": 12, "color": values, "colorscale": COLORSCALE, "cmin": lo, "cmax": hi,
                "line": {"color": "white", "width": 1.5}, "showscale": not pts.gridded,
                "colorbar": {"title": {"text": metric}}},
        customdata=[[d[0]] for d in pts.done],
        text=[f"trial {d[0]}<br>{pts.x} = {_fmt(d[1])}" + (f"<br>{pts.y} = {_fmt(d[2])}" if pts.y else "")
              + f"<br>{metric} = {d[3]:.4f}" for d in pts.done],
        hovertemplate="%{text}<extra></extra>",
    ))
    if pts.others:
        oy = [o[2] if pts.y is not None else lo for o in pts.others]
        fig.add_trace(go.Scatter(
            x=[o[1] for o in pts.others], y=oy, mode="markers", name="not finished (running / failed)",
            marker={"symbol": "x", "size": 10, "color": "#888"}, customdata=[[o[0]] for o in pts.others],
            text=[f"trial {o[0]}: {o[3]}" for o in pts.others], hovertemplate="%{text}<extra></extra>",
        ))
    if pts.best is not None:
        n, bx, by, bv = pts.best
        by_plot = by if pts.y is not None else bv
        label = f"best: trial {n} ({metric} {bv:.4f})"
        fig.add_trace(go.Scatter(
            x=[bx], y=[by_plot], mode="markers+text", name=label, text=[f"best: trial {n}"], textposition="top center",
            marker={"symbol": "star", "size": 22, "color": "#e4572e", "line": {"color": "white", "width": 1.5}},
            customdata=[[n]], hovertemplate=f"{label}<extra></extra>",
        ))
    fig.update_layout(
        height=height, margin={"l": 60, "r": 20, "t": 30, "b": 50},
        xaxis={"title": {"text": pts.x}, "type": "log" if pts.log_x else "linear"},
        yaxis={"title": {"text": y_name}, "type": "log" if pts.log_y else "linear"},
        legend={"orientation": "h", "y": -0.15},
    )
    return fig
