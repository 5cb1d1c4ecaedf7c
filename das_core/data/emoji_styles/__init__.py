"""``emoji-styles``: one emoji drawn by up to eight vendors, as a many-class, few-image dataset.

Class = one emoji (its code points), images = its drawings in the Iconify sets noto, twemoji,
openmoji, fluent-emoji-flat, noto-v1, emojione, emojione-v1 and fxemoji (npm packages
``@iconify-json/<set>`` at the versions pinned in this folder's package-lock.json), rendered
once on white into ``<data>/emoji-styles/emoji-styles-<size>.npz``. Emoji drawn in at least
five styles are kept. The class-disjoint split is stored in ``split.json`` (a seeded half of
the classes trains, the rest test), so it never moves with package updates.

``load_emoji_styles`` is the ``--dataset emoji-styles`` loader; ``emoji_arrays`` gives the
same data as plain numpy arrays (for GPU scripts); ``prepare`` installs and renders.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from das_core.data.base import ArrayDataset, DatasetError, DatasetSplits, default_data_dir, split_by_classes
from das_core.data.emoji_styles.render import DEFAULT_SIZE, build_rendered, cache_path, load_rendered
from das_core.data.emoji_styles.sources import (
    RECIPE,
    SPLIT_PATH,
    Recipe,
    Style,
    install_packages,
    installed_versions,
)

log = logging.getLogger(__name__)

NAME = "emoji-styles"


def default_root() -> Path:
    return default_data_dir() / NAME


def require_rendered(size: int | None = None, data_root: str | Path | None = None) -> Path:
    """The rendered file the loader would read for a model of input ``size``; a
    ``DatasetError`` saying how to build it when it is not there (the app asks for this
    instead of installing and rendering for minutes behind a spinner)."""
    base = default_root() if data_root is None else Path(data_root).expanduser()
    px = max(DEFAULT_SIZE, size or 0)
    path = cache_path(base, px)
    if not path.is_file():
        how = "make data" if px == DEFAULT_SIZE else f"python -m das_core data download emoji-styles --size {px}"
        raise DatasetError(
            f"emoji-styles is not installed here ({path} is missing): run `{how}` in the repository (installs the "
            "pinned npm emoji sets and renders them once, a few minutes; the app needs the images for its "
            "thumbnails and queries)"
        )
    return path


def make_split(keys: Sequence[str], seed: int = 0) -> dict[str, object]:
    """A seeded half of ``keys`` (sorted first) to train, the rest to test."""
    ordered = sorted(keys)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    k = len(ordered) // 2
    return {
        "seed": seed,
        "rule": "numpy.random.default_rng(seed).permutation over the sorted class keys; first half trains",
        "train": sorted(ordered[i] for i in perm[:k]),
        "test": sorted(ordered[i] for i in perm[k:]),
    }


def read_split(path: Path = SPLIT_PATH) -> tuple[list[str], list[str]]:
    try:
        data = json.loads(path.read_text())
        train, test = [str(k) for k in data["train"]], [str(k) for k in data["test"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"emoji-styles: cannot read the stored split {path}: {exc}") from exc
    if set(train) & set(test):
        raise DatasetError(f"emoji-styles: {path} lists classes in both train and test")
    return train, test


def prepare(
    root: Path | None = None,
    size: int = DEFAULT_SIZE,
    *,
    recipe: Recipe = RECIPE,
    install: bool = True,
    workers: int | None = None,
) -> Path:
    """Install the pinned sets (``npm ci``, only when they are not there at those versions) and
    render them at ``size`` px (only when the cache is missing or stale); returns the file.

    A cache file with no package beside it at all (copied alone to another machine, e.g. a
    GPU host without registry access) is used as it is."""
    root = default_root() if root is None else Path(root).expanduser()
    path = cache_path(root, size)
    if path.is_file() and not any(installed_versions(root, recipe.styles).values()):
        log.info("emoji-styles: no Iconify package in %s; using the rendered %s as it is", root, path.name)
        return path
    if install:
        install_packages(root)
    return build_rendered(root, size, recipe=recipe, workers=workers)


@dataclass
class EmojiArrays:
    """The whole dataset as numpy arrays; ``split[i]`` is ``"train"`` or ``"test"``
    (``""`` for a class outside the stored split, which loaders leave out)."""

    images: np.ndarray  # uint8 (N, H, W, 3), white background
    labels: np.ndarray  # int64 (N,), index into class_names / class_keys
    class_names: list[str]
    class_keys: list[str]  # code points, e.g. "1f600" or "1f468-200d-1f373"
    styles: np.ndarray  # int64 (N,), index into style_names
    style_names: list[str]
    licences: list[str]  # SPDX id per style
    versions: list[str]  # npm package version per style
    split: np.ndarray  # str (N,)
    build_notes: list[str]  # what the builder left out, and the render time
    split_notes: list[str]  # classes outside the stored split, or split classes not rendered


def emoji_arrays(
    size: int = DEFAULT_SIZE,
    root: str | Path | None = None,
    *,
    recipe: Recipe = RECIPE,
    install: bool = True,
) -> EmojiArrays:
    """The rendered data at ``size`` px as numpy arrays, installing and rendering first where
    needed. For scripts that read the rendered data from one file (``cache_path``)."""
    base = default_root() if root is None else Path(root).expanduser()
    return arrays_from_file(prepare(base, size, recipe=recipe, install=install), recipe.split)


def arrays_from_file(path: str | Path, split_path: Path = SPLIT_PATH) -> EmojiArrays:
    """The arrays of one rendered file (``emoji-styles-<size>.npz``) with the stored split; no
    package or registry needed."""
    r = load_rendered(Path(path))
    train, test = read_split(split_path)
    side = {k: "train" for k in train} | {k: "test" for k in test}
    class_split = np.array([side.get(k, "") for k in r.class_keys], dtype="<U5")
    notes = []
    outside = int((class_split == "").sum())
    if outside:
        notes.append(f"{outside} rendered classes are not in the stored split {split_path.name} and are left out")
    missing = len(set(side) - set(r.class_keys))
    if missing:
        notes.append(f"{missing} classes of the stored split are not in the installed sets")
    return EmojiArrays(
        r.images, r.labels, r.class_names, r.class_keys, r.styles, r.style_names, r.licences, r.versions,
        class_split[r.labels] if len(r.labels) else np.zeros(0, dtype="<U5"), r.notes, notes,
    )


class EmojiDataset(ArrayDataset):
    """An ``ArrayDataset`` that also knows each image's style (vendor)."""

    def __init__(
        self,
        split: str,
        images: np.ndarray,
        labels: np.ndarray,
        class_names: Sequence[str],
        styles: np.ndarray,
        style_names: Sequence[str],
        source: str = "",
    ) -> None:
        super().__init__(NAME, split, images, labels, class_names, source=source)
        self.styles = styles
        self.style_names = list(style_names)

    def _take(self, indices: np.ndarray) -> EmojiDataset:
        out = super()._take(indices)
        assert isinstance(out, EmojiDataset)
        out.styles = self.styles[indices]
        return out

    def style_of(self, index: int) -> str:
        return self.style_names[int(self.styles[index])]

    def describe_item(self, index: int) -> str:
        return f"{self.source or self.name}/{self.split}#{index} ({self.style_of(index)})"


def load_emoji_styles(
    data_root: str | Path | None = None,
    *,
    size: int = DEFAULT_SIZE,
    recipe: Recipe = RECIPE,
    install: bool = True,
) -> DatasetSplits:
    """The ``emoji-styles`` splits (``data_root``: the folder holding ``npm/`` and the caches;
    default ``data/emoji-styles``), images rendered at ``size`` px."""
    a = emoji_arrays(size, data_root, recipe=recipe, install=install)
    base = default_root() if data_root is None else Path(data_root).expanduser()
    full = EmojiDataset(
        "all", a.images, a.labels, a.class_names, a.styles, a.style_names, source=str(cache_path(base, size))
    )
    class_split = np.array([""] * len(a.class_names), dtype="<U5")
    class_split[a.labels] = a.split
    train_ids = np.flatnonzero(class_split == "train")
    test_ids = np.flatnonzero(class_split == "test")
    if len(train_ids) < 1 or len(test_ids) < 1:
        raise DatasetError(
            f"emoji-styles: the stored split {recipe.split} leaves {len(train_ids)} train and {len(test_ids)} "
            "test classes among the rendered ones; it must name both"
        )
    train, test = split_by_classes(full, train_ids.tolist(), test_ids.tolist())
    return DatasetSplits(NAME, train, test, source=str(cache_path(base, size)), notes=a.split_notes)


def describe(a: EmojiArrays) -> list[str]:
    """Lines for ``python -m das_core data check emoji-styles``: per split classes, images per
    class (min / median / max), images per style, and each style's licence."""
    lines = []
    for split in ("train", "test"):
        mask = a.split == split
        counts = np.bincount(a.labels[mask], minlength=len(a.class_names))
        counts = counts[counts > 0]
        if len(counts) == 0:
            lines.append(f"  {split:<5} no classes")
            continue
        lines.append(
            f"  {split:<5} {len(counts):>5} classes  {int(mask.sum()):>6} images  images per class "
            f"min {int(counts.min())} / median {float(np.median(counts)):g} / max {int(counts.max())}"
        )
    lines.append("  styles (npm @iconify-json/<set>, version, licence, images):")
    for si, name in enumerate(a.style_names):
        lines.append(f"    {name:<18} {a.versions[si]:<8} {a.licences[si]:<13} {int((a.styles == si).sum()):>5}")
    return lines


def style_grid(a: EmojiArrays, keys: Sequence[str], pad: int = 2) -> np.ndarray:
    """A picture of classes ``keys`` (rows) across the styles (columns; white where a style
    lacks the emoji), as a uint8 RGB array (the README's picture)."""
    h, w = a.images.shape[1:3]
    rows, cols = len(keys), len(a.style_names)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, key in enumerate(keys):
        if key not in a.class_keys:
            raise DatasetError(f"emoji-styles: no class {key!r}")
        k = a.class_keys.index(key)
        for i in np.flatnonzero(a.labels == k):
            c = int(a.styles[i])
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            out[y : y + h, x : x + w] = a.images[i]
    return out


def cmd_emoji_styles(command: str, root: str | None, size: int | None) -> int:
    """``python -m das_core data {download,check} emoji-styles [--root DIR] [--size N]``."""
    px = DEFAULT_SIZE if size is None else size
    if command == "download":
        path = prepare(None if root is None else Path(root), px)
        print(f"emoji-styles is ready: {path}")
        return 0
    a = emoji_arrays(px, root)
    print(f"{NAME}: {cache_path(default_root() if root is None else Path(root).expanduser(), px)}")
    print(f"  {len(a.class_names)} classes, {len(a.labels)} images at {a.images.shape[1]} px")
    for line in describe(a):
        print(line)
    for note in a.build_notes + a.split_notes:
        print(f"  note: {note}")
    return 0


__all__ = [
    "DEFAULT_SIZE",
    "NAME",
    "RECIPE",
    "Recipe",
    "arrays_from_file",
    "cache_path",
    "default_root",
    "Style",
    "EmojiArrays",
    "EmojiDataset",
    "cmd_emoji_styles",
    "describe",
    "emoji_arrays",
    "load_emoji_styles",
    "make_split",
    "prepare",
    "read_split",
    "style_grid",
]
