"""das_core.explorer.selection: which map points a box or lasso selection holds (the Explore
page recounts the produced points inside a kept selection after a slider move). Points and
regions sit on an integer/half-integer lattice, so every comparison is exact in float64."""

from __future__ import annotations

import numpy as np

from das_core.explorer.selection import in_regions

GRID = np.array([(x, y) for x in range(5) for y in range(5)], dtype=np.float32)  # 0..4 x 0..4


def test_box_either_corner_order_edges_included() -> None:
    a = in_regions(GRID, boxes=[{"x": [1, 3], "y": [0, 2]}])
    b = in_regions(GRID, boxes=[{"x": [3, 1], "y": [2, 0]}])
    np.testing.assert_array_equal(a, b)
    assert {tuple(p) for p in GRID[a].astype(int)} == {(x, y) for x in (1, 2, 3) for y in (0, 1, 2)}


def test_lasso_square_and_triangle_even_odd() -> None:
    square = {"x": [0.5, 2.5, 2.5, 0.5], "y": [0.5, 0.5, 2.5, 2.5]}
    inside = in_regions(GRID, lassos=[square])
    assert {tuple(p) for p in GRID[inside].astype(int)} == {(x, y) for x in (1, 2) for y in (1, 2)}
    triangle = {"x": [-0.5, 4.5, -0.5], "y": [-0.5, -0.5, 4.5]}  # below the anti-diagonal x + y = 4
    tri = in_regions(GRID, lassos=[triangle])
    assert {tuple(p) for p in GRID[tri].astype(int)} == {(x, y) for x in range(5) for y in range(5) if x + y < 4}


def test_union_of_regions_and_degenerate_input() -> None:
    m = in_regions(GRID, boxes=[{"x": [0, 0], "y": [0, 0]}], lassos=[{"x": [3.5, 4.5, 4.5, 3.5], "y": [3.5, 3.5, 4.5, 4.5]}])
    assert {tuple(p) for p in GRID[m].astype(int)} == {(0, 0), (4, 4)}
    assert not in_regions(GRID, lassos=[{"x": [0, 1], "y": [0, 1]}]).any()  # not a polygon
    assert in_regions(np.zeros((0, 2), np.float32), boxes=[{"x": [0, 1], "y": [0, 1]}]).shape == (0,)
