"""Comparing two runs or two maps of the same images: whether two checkpoints can be compared
on a split, Procrustes alignment of maps, per-point displacement, and how DAS shifts a map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from das_core.training.config import TrainConfig


def _pairs(n_ref: int, n: int, pairs: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    if pairs is None:
        if n_ref != n:
            raise ValueError(
                f"the maps have {n_ref} and {n} points: pass pairs=(reference_rows, rows) of the shared points"
            )
        ar = np.arange(n)
        return ar, ar
    a, b = (np.asarray(v, dtype=np.int64) for v in pairs)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("pairs must be two 1-D index arrays of the same length")
    return a, b


def align_to(
    reference_coords: np.ndarray,
    coords: np.ndarray,
    *,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """``coords`` rotated (or reflected), scaled and translated onto ``reference_coords``
    (orthogonal Procrustes, least squares over the shared points), so that two maps of the
    same images can be compared. Shared points: the same rows in both (default), or
    ``pairs=(reference_rows, rows)``. Every row of ``coords`` is transformed."""
    from scipy.linalg import orthogonal_procrustes

    ref = np.asarray(reference_coords, dtype=np.float64)
    xy = np.asarray(coords, dtype=np.float64)
    ia, ib = _pairs(ref.shape[0], xy.shape[0], pairs)
    if len(ia) < 2:
        raise ValueError("alignment needs at least 2 shared points")
    a, b = ref[ia], xy[ib]
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    a0, b0 = a - mu_a, b - mu_b
    nb = float((b0**2).sum())
    if nb == 0.0:
        return np.broadcast_to(mu_a, xy.shape).astype(np.float32)
    rot, sv_sum = orthogonal_procrustes(b0, a0)  # b0 @ rot ≈ a0 (up to scale)
    scale = float(sv_sum) / nb
    out: np.ndarray = ((xy - mu_b) @ np.asarray(rot, dtype=np.float64) * scale + mu_a).astype(np.float32)
    return out


def _unit_scale(xy: np.ndarray) -> np.ndarray:
    c = xy - xy.mean(axis=0)
    rms = float(np.sqrt((c**2).sum(axis=1).mean())) if len(c) else 0.0
    out: np.ndarray = c / rms if rms > 0 else c
    return out


def displacement(
    a_coords: np.ndarray,
    b_coords: np.ndarray,
    *,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
    trim: float = 0.1,
) -> np.ndarray:
    """Per shared point, the distance between its position in map ``a`` and its aligned
    position in map ``b``, both maps normalised to unit RMS radius (1 = a map's typical
    radius). The alignment is trimmed: fitted on all points, then refitted without the
    ``trim`` fraction that moved most, so that the movers do not bend it."""
    a = np.asarray(a_coords, dtype=np.float64)
    b = np.asarray(b_coords, dtype=np.float64)
    ia, ib = _pairs(a.shape[0], b.shape[0], pairs)
    a_s, b_s = _unit_scale(a[ia]), _unit_scale(b[ib])
    d = np.linalg.norm(align_to(a_s, b_s).astype(np.float64) - a_s, axis=1)
    keep = np.flatnonzero(d <= np.quantile(d, 1.0 - trim)) if len(d) and trim > 0 else np.arange(len(d))
    if len(keep) >= 3:
        aligned = align_to(a_s, b_s, pairs=(keep, keep)).astype(np.float64)
        d = np.linalg.norm(aligned - a_s, axis=1)
    out: np.ndarray = d
    return out


def moved_most(
    a_coords: np.ndarray,
    b_coords: np.ndarray,
    k: int = 20,
    *,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Indices (rows of ``a``; of the shared points when ``pairs`` is given) of the ``k``
    points whose positions differ most between the two maps once aligned (``displacement``),
    largest first."""
    d = displacement(a_coords, b_coords, pairs=pairs)
    order = np.argsort(-d, kind="stable")[: max(0, int(k))]
    if pairs is not None:
        return np.asarray(pairs[0], dtype=np.int64)[order]
    return order.astype(np.int64)


def comparable(a: TrainConfig, b: TrainConfig, split: str) -> str | None:
    """``None`` when the two checkpoints' ``split`` holds the same images in the same order
    (so item ``i`` is the same image in both), else why not, in a sentence."""
    if a.dataset != b.dataset:
        return (f"the two checkpoints were trained on different datasets ({a.dataset} and {b.dataset}): "
                "their maps show different images and cannot be compared point by point")
    if (a.data_root or None) != (b.data_root or None) or a.train_classes != b.train_classes:
        return "the two checkpoints read the dataset from different folders or class splits"
    if split in ("train", "val"):
        keys = ("val_classes", "val_fraction") + (("seed",) if (a.val_classes or a.val_fraction) else ())
        diff = [k for k in keys if getattr(a, k) != getattr(b, k)]
        if diff:
            return (f"their {split} splits differ (the validation split is carved differently: "
                    f"{', '.join(f'{k} {getattr(a, k)} vs {getattr(b, k)}' for k in diff)}); "
                    "compare them on the test split")
    return None


def _own_class_share(emb: np.ndarray, labels: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """For each of ``rows``: the share of its ``n`` nearest neighbours (itself excluded, original
    embedding space) that have its label."""
    from das_core.retrieval.knn import L2_KNN

    if len(rows) == 0 or len(emb) < 2:
        return np.zeros(len(rows), np.float64)
    _, idx = L2_KNN(emb[rows], emb, n, exclude=rows)  # k capped at len(emb) - 1
    same: np.ndarray = (labels[idx] == labels[rows][:, None]).mean(axis=1)
    return same


@dataclass(frozen=True)
class MapShift:
    aligned_b: np.ndarray  # (N, 2) map b rotated/scaled/translated onto map a
    displacement: np.ndarray  # (N,) distance between a and aligned b (unit map radius)
    moved: np.ndarray  # (k,) indices of the points that moved most, largest first
    rows: list[dict[str, Any]]  # one per moved point


def map_shift(
    a_coords: np.ndarray, b_coords: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *,
    emb_a: np.ndarray | None = None, emb_b: np.ndarray | None = None, k: int = 20, neighbours: int = 10,
) -> MapShift:
    """Map ``b`` aligned onto map ``a`` (orthogonal Procrustes over the same images in the same
    order, refitted without the 10 % of points that moved most), each point's displacement, and the ``k`` points that moved most with
    their class and, given both embeddings, the share of their ``neighbours`` nearest
    neighbours of their own class under each checkpoint (original spaces, not the maps):
    did the move bring the point among its class or away from it?"""

    a = np.asarray(a_coords, dtype=np.float32)
    b = np.asarray(b_coords, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if a.shape != b.shape or a.shape[0] != len(y):
        raise ValueError(f"the maps ({a.shape}, {b.shape}) and labels ({len(y)}) must hold the same points")
    aligned = align_to(a, b)
    # refit without the 10 % that moved most, as ``displacement`` does: movers must not bend it
    d0 = np.linalg.norm(aligned - a, axis=1)
    keep = np.flatnonzero(d0 <= np.quantile(d0, 0.9)) if len(d0) else d0.astype(np.int64)
    if len(keep) >= 3:
        aligned = align_to(a, b, pairs=(keep, keep))
    disp = displacement(a, b)
    moved = np.argsort(-disp, kind="stable")[: max(0, int(k))].astype(np.int64)
    own_a = _own_class_share(np.asarray(emb_a, np.float32), y, moved, neighbours) if emb_a is not None else None
    own_b = _own_class_share(np.asarray(emb_b, np.float32), y, moved, neighbours) if emb_b is not None else None
    rows = []
    for j, i in enumerate(moved):
        row: dict[str, Any] = {
            "rank": j + 1, "index": int(i), "class": str(class_names[int(y[i])]),
            "displacement": round(float(disp[i]), 4),
        }
        if own_a is not None:
            row[f"own class in {neighbours}-NN (A)"] = round(float(own_a[j]), 3)
        if own_b is not None:
            row[f"own class in {neighbours}-NN (B)"] = round(float(own_b[j]), 3)
        rows.append(row)
    return MapShift(aligned_b=aligned, displacement=disp, moved=moved, rows=rows)
