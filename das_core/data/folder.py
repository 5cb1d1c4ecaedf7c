"""Your own images: ``<root>/<class name>/<images>`` (subfolders of a class folder included;
an image in ``<root>/<class name>/<style>/...`` has that subfolder's name as its style, shown
next to retrieval results).

Classes are the non-hidden subfolders of ``root``, sorted by name; the first
``train_classes`` of them train (default: half, rounded down) and the rest test. Files with
a common image extension (jpg, jpeg, png, webp, bmp, gif, tif, tiff; any case) count;
hidden files and folders (``.name``) and other files are ignored.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from das_core.data.base import DatasetError, DatasetSplits
from das_core.data.layout import SHOW, Layout, build_splits

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

LAYOUT = Layout(
    title="image folder",
    name="folder",
    folder=None,
    required=(),
    description="<root>/<class name>/<image>.jpg (one subfolder of images per class, at least 2 classes)",
    fix="Pass --data-root DIR pointing at the folder that holds the class folders",
    official=False,
)


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _images_in(folder: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):  # symlinked subfolders: not followed (loops)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if is_image_file(f))
    return found


def scan_image_folder(data_root: str | Path) -> tuple[Path, list[str], list[list[Path]]]:
    """``(root, class names sorted, images of each class)``; ``DatasetError`` when the folder
    does not exist, has fewer than 2 class folders, or a class folder holds no image."""
    root = LAYOUT.root(data_root)
    try:
        entries = sorted(root.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise LAYOUT.error(f"cannot list {root}: {exc.strerror or exc}", layout=False) from exc
    class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    if len(class_dirs) < 2:
        loose = sum(1 for e in entries if e.is_file() and is_image_file(e.name))
        hint = f"; the {loose} images directly in {root} belong in per-class subfolders" if loose else ""
        raise LAYOUT.error(
            f"found {len(class_dirs)} class folder(s) in {root}, need at least 2 for class-disjoint "
            f"train/test splits{hint}"
        )
    images = [_images_in(d) for d in class_dirs]
    empty = [d.name for d, imgs in zip(class_dirs, images, strict=True) if not imgs]
    if empty:
        shown = ", ".join(empty[:SHOW]) + (", ..." if len(empty) > SHOW else "")
        exts = ", ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
        raise LAYOUT.error(
            f"{len(empty)} class folder(s) in {root} hold no images ({exts}): {shown}; add images or remove them",
            layout=False,
        )
    return root, [d.name for d in class_dirs], images


def load_image_folder(data_root: str | Path | None, train_classes: int | None = None) -> DatasetSplits:
    """An image folder as class-disjoint splits: the first ``train_classes`` classes (sorted by
    name; default half, rounded down, at least 1) train, the rest test."""
    if data_root is None:
        raise DatasetError(
            "image folder: no folder given; pass --data-root DIR where DIR holds one subfolder of "
            "images per class (DIR/<class name>/<image>.jpg), at least 2 classes"
        )
    root, names, images = scan_image_folder(data_root)
    n = len(names)
    k = max(1, n // 2) if train_classes is None else train_classes
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n - 1:
        raise DatasetError(
            f"image folder: train_classes={train_classes!r} is out of range for the {n} classes in {root}: "
            f"use 1..{n - 1} (the first train_classes classes by name train, the rest test)"
        )
    paths = [p for imgs in images for p in imgs]
    class_ids = np.repeat(np.arange(n, dtype=np.int64), [len(imgs) for imgs in images])
    ids = list(range(n))
    # an image in a subfolder of its class folder has that subfolder's name as its style
    styles = [p.relative_to(root / names[c]).parts[0] if len(p.relative_to(root / names[c]).parts) > 1 else ""
              for p, c in zip(paths, class_ids, strict=True)]
    return build_splits(
        LAYOUT, paths, class_ids, dict(enumerate(names)), ids[: int(k)], ids[int(k) :], source=str(root),
        styles=styles if any(styles) else None,
    )
