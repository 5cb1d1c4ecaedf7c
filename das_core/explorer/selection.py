"""Which map points lie inside a box or lasso selection: the Explore page keeps a selection
while the sliders move the produced points, so it counts them again from the region itself
instead of from the (stale) list of points the browser reported when the region was drawn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _in_polygon(xy: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Even-odd rule (ray casting to +x), vectorised over the points."""
    x, y = xy[:, 0:1], xy[:, 1:2]
    x0, y0 = px[None, :], py[None, :]
    x1, y1 = np.roll(px, -1)[None, :], np.roll(py, -1)[None, :]
    crosses = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    inside: np.ndarray = (crosses & (x < x_at)).sum(axis=1) % 2 == 1
    return inside


def in_regions(
    xy: np.ndarray, boxes: Sequence[Mapping[str, Any]] = (), lassos: Sequence[Mapping[str, Any]] = ()
) -> np.ndarray:
    """A boolean mask over the rows of ``xy`` (N x 2 map coordinates): inside any of the boxes
    (``{"x": [x0, x1], "y": [y0, y1]}``, either order, edges included) or lassos
    (``{"x": [...], "y": [...]}``, a closed polygon, even-odd rule), as Plotly's selection
    events describe them."""
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    mask = np.zeros(len(pts), dtype=bool)
    for b in boxes:
        (xa, xb), (ya, yb) = sorted(map(float, b["x"])), sorted(map(float, b["y"]))
        mask |= (pts[:, 0] >= xa) & (pts[:, 0] <= xb) & (pts[:, 1] >= ya) & (pts[:, 1] <= yb)
    for poly in lassos:
        px, py = np.asarray(poly["x"], dtype=np.float64), np.asarray(poly["y"], dtype=np.float64)
        if len(px) >= 3 and len(px) == len(py):
            mask |= _in_polygon(pts, px, py)
    return mask
