"""Rendering the matched emoji once into a cached array file ``emoji-styles-<size>.npz``.

Each icon's SVG is rasterised by CairoSVG (a PyPI package over the system's libcairo) at
``size`` x ``size`` pixels on white, in a pool of at most two processes. The file holds
``images`` (uint8 N x size x size x 3), ``labels`` (class index per image), ``styles`` (style
index per image), ``class_keys`` (code points), ``class_names``, ``style_names``,
``licences`` and a ``stamp`` (package versions, size, builder version): a file whose stamp
differs from what would be built now is rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from das_core.data.base import DatasetError
from das_core.data.emoji_styles.sources import (
    RECIPE,
    Catalogue,
    Recipe,
    installed_versions,
    read_catalogue,
    read_near_duplicates,
)
from das_core.store.io import atomic_write

log = logging.getLogger(__name__)

BUILDER_VERSION = 1
DEFAULT_SIZE = 64
MAX_WORKERS = 2  # two cores on the machines this runs on


def cache_path(root: Path, size: int) -> Path:
    return root / f"emoji-styles-{size}.npz"


def render_svg(svg: str, size: int) -> np.ndarray:
    """One SVG as a uint8 ``(size, size, 3)`` image on white (aspect kept, centred)."""
    import cairosvg
    from PIL import Image

    png = cairosvg.svg2png(bytestring=svg.encode(), output_width=size, output_height=size)
    rgba = Image.open(io.BytesIO(png)).convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)


def _render_chunk(args: tuple[list[str], int]) -> np.ndarray:
    svgs, size = args
    out = np.empty((len(svgs), size, size, 3), dtype=np.uint8)
    for i, svg in enumerate(svgs):
        out[i] = render_svg(svg, size)
    return out


def render_all(svgs: Sequence[str], size: int, workers: int | None = None) -> np.ndarray:
    """Render ``svgs`` at ``size`` px (in ``workers`` processes, at most two by default)."""
    n_workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1) if workers is None else workers)
    chunk = 64
    parts = [(list(svgs[i : i + chunk]), size) for i in range(0, len(svgs), chunk)]
    if n_workers == 1 or len(parts) <= 1:
        arrays = [_render_chunk(p) for p in parts]
    else:
        with ProcessPoolExecutor(n_workers) as pool:
            arrays = list(pool.map(_render_chunk, parts))
    if not arrays:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.concatenate(arrays)


def stamp_for(recipe: Recipe, versions: dict[str, str | None], size: int) -> str:
    """What a cache file was built from; a file with another stamp is rebuilt."""
    excluded = sorted(read_near_duplicates(recipe.near_duplicates))
    return json.dumps(
        {
            "builder": BUILDER_VERSION,
            "size": size,
            "min_styles": recipe.min_styles,
            "sets": versions,
            "near_duplicates": hashlib.sha1(json.dumps(excluded).encode()).hexdigest()[:12],
        },
        sort_keys=True,
    )


@dataclass
class Rendered:
    """The rendered dataset (all classes): what the cache file holds."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N,), index into class_keys
    styles: np.ndarray  # int64 (N,), index into style_names
    class_keys: list[str]
    class_names: list[str]
    style_names: list[str]
    licences: list[str]  # one per style: SPDX id
    versions: list[str]  # one per style: npm package version
    stamp: str
    notes: list[str]


def render_catalogue(cat: Catalogue, size: int, stamp: str, workers: int | None = None) -> Rendered:
    svgs: list[str] = []
    labels: list[int] = []
    styles: list[int] = []
    for k, imgs in enumerate(cat.images):
        for si, icon in imgs:
            svgs.append(icon.svg())
            labels.append(k)
            styles.append(si)
    t0 = time.perf_counter()
    images = render_all(svgs, size, workers)
    seconds = time.perf_counter() - t0
    log.info("emoji-styles: rendered %d SVGs at %d px in %.1f s", len(svgs), size, seconds)
    notes = [f"{reason}: {n}" for reason, n in cat.dropped.items()]
    notes.append(f"rendered {len(svgs)} images at {size} px in {seconds:.1f} s")
    return Rendered(
        images,
        np.asarray(labels, dtype=np.int64),
        np.asarray(styles, dtype=np.int64),
        cat.keys,
        cat.names,
        [s.prefix for s in cat.sets],
        [s.licence for s in cat.sets],
        [s.version for s in cat.sets],
        stamp,
        notes,
    )


def save_rendered(path: Path, r: Rendered) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a handle: given a path, numpy would append ".npz"
            _savez(fh, r)
        tmp.chmod(0o644)  # readable like any data file (the temporary file starts private)

    atomic_write(path, write)


def _savez(fh: BinaryIO, r: Rendered) -> None:
    np.savez_compressed(
        fh,
        images=r.images,
        labels=r.labels,
        styles=r.styles,
        class_keys=np.asarray(r.class_keys),
        class_names=np.asarray(r.class_names),
        style_names=np.asarray(r.style_names),
        licences=np.asarray(r.licences),
        versions=np.asarray(r.versions),
        stamp=np.asarray(r.stamp),
        notes=np.asarray(r.notes),
    )


def load_rendered(path: Path) -> Rendered:
    try:
        with np.load(path, allow_pickle=False) as z:
            return Rendered(
                images=z["images"],
                labels=z["labels"].astype(np.int64),
                styles=z["styles"].astype(np.int64),
                class_keys=[str(x) for x in z["class_keys"]],
                class_names=[str(x) for x in z["class_names"]],
                style_names=[str(x) for x in z["style_names"]],
                licences=[str(x) for x in z["licences"]],
                versions=[str(x) for x in z["versions"]],
                stamp=str(z["stamp"]),
                notes=[str(x) for x in z["notes"]],
            )
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise DatasetError(
            f"emoji-styles: cannot read the rendered cache {path} ({exc}); delete it and run `make data` "
            "(it is rebuilt from the installed packages)"
        ) from exc


def find_near_duplicates(r: Rendered, threshold: float = 0.01, compare_px: int = 32) -> list[dict[str, object]]:
    """Pairs of images of different classes within one style that look the same: the RMS
    difference of their ``compare_px`` versions (on white, in [0, 1]) is below ``threshold``.
    (For instance fluent-emoji-flat's white square button is a white square around a black
    square, so on white it is the black medium square.) Run once; the result is stored in
    near_duplicates.json and applied to every build, so every size has the same classes."""
    import torch

    found: list[dict[str, object]] = []
    x = torch.from_numpy(r.images).permute(0, 3, 1, 2).float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(compare_px, compare_px), mode="area").flatten(1)
    for si, style in enumerate(r.style_names):
        idx = np.flatnonzero(r.styles == si)
        d = torch.cdist(x[idx], x[idx]) / float(np.sqrt(x.shape[1]))
        lab = torch.from_numpy(r.labels[idx])
        close = (d < threshold) & (lab[:, None] != lab[None, :])
        for a, b in torch.nonzero(torch.triu(close, diagonal=1)).tolist():
            found.append(
                {
                    "style": style,
                    "classes": sorted([r.class_keys[int(r.labels[idx[a]])], r.class_keys[int(r.labels[idx[b]])]]),
                    "rms": round(float(d[a, b]), 4),
                }
            )
    return found


def build_rendered(
    root: Path,
    size: int = DEFAULT_SIZE,
    *,
    recipe: Recipe = RECIPE,
    workers: int | None = None,
    force: bool = False,
) -> Path:
    """Render ``root``'s installed sets into ``cache_path(root, size)`` unless a file built from
    the same package versions and recipe is there (checked without reading the sets)."""
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 1024:
        raise DatasetError(f"emoji-styles: size must be an integer in 8..1024 pixels, got {size!r}")
    path = cache_path(root, size)
    stamp = stamp_for(recipe, installed_versions(root, recipe.styles), size)
    if path.is_file() and not force:
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["stamp"]) == stamp:
                    return path
        except (OSError, ValueError, KeyError, EOFError):
            pass
        log.info("emoji-styles: %s is stale or unreadable; rendering it again", path)
    cat = read_catalogue(root, recipe)
    save_rendered(path, render_catalogue(cat, size, stamp, workers))
    return path
