"""CUB-200-2011 (Caltech-UCSD Birds) in its official layout.

``<root>/CUB_200_2011/{images.txt, image_class_labels.txt, classes.txt, images/<class>/<file>.jpg}``
as extracted from ``CUB_200_2011.tgz``; ``data_root`` may also be ``CUB_200_2011/`` itself.

Split (the standard zero-shot protocol): the first half of the classes listed in
``classes.txt`` trains and the second half tests -- classes 1-100 / 101-200 on the real data
(5,864 / 5,924 images). The official ``train_test_split.txt`` (a split *within* each class) is
not used. Stated as halves so that small fixtures in the same layout work too.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from das_core.data.base import DatasetSplits
from das_core.data.layout import SHOW, Layout, build_splits, check_files_exist, first_half, read_index

LAYOUT = Layout(
    title="CUB-200-2011",
    name="cub200",
    folder="CUB_200_2011",
    required=("images.txt", "image_class_labels.txt", "classes.txt", "images"),
    description="<root>/CUB_200_2011/{images.txt, image_class_labels.txt, classes.txt, images/...}",
    fix="Download with `python -m das_core data download cub200 --root DIR` or extract CUB_200_2011.tgz into DIR",
)

_PREFIX = re.compile(r"^\d+\.")


def class_name(folder: str) -> str:
    """``"001.Black_footed_Albatross"`` -> ``"Black_footed_Albatross"``."""
    return _PREFIX.sub("", folder, count=1) or folder


def locate_cub200(data_root: str | Path | None = None) -> Path:
    """The ``CUB_200_2011`` folder under ``data_root``; ``DatasetError`` if the layout is wrong."""
    return LAYOUT.locate(data_root)


def load_cub200(data_root: str | Path | None = None, *, check_files: bool = True) -> DatasetSplits:
    """CUB-200-2011 as class-disjoint train (first half of the classes) / test (second half)."""
    folder = locate_cub200(data_root)
    classes = read_index(LAYOUT, folder / "classes.txt", ("class_id", "class_folder"))
    images = read_index(LAYOUT, folder / "images.txt", ("image_id", "path"))
    labels = read_index(LAYOUT, folder / "image_class_labels.txt", ("image_id", "class_id"))

    class_ids = classes.ints("class_id", unique=True)
    names = {int(c): class_name(f) for c, f in zip(class_ids, classes.text("class_folder"), strict=True)}
    image_ids = images.ints("image_id", unique=True)
    label_image_ids = labels.ints("image_id", unique=True)
    label_class_ids = labels.ints("class_id")

    unknown = np.flatnonzero(~np.isin(label_class_ids, class_ids))
    if len(unknown):
        raise labels.line_error(
            labels.lines[unknown[0]],
            f"class_id {int(label_class_ids[unknown[0]])} is not listed in {folder / 'classes.txt'}",
        )
    # image id -> class id, for the images of images.txt
    order = np.argsort(label_image_ids)
    pos = np.clip(np.searchsorted(label_image_ids, image_ids, sorter=order), 0, len(order) - 1)
    found = label_image_ids[order[pos]] == image_ids
    if not found.all():
        miss = np.flatnonzero(~found)
        shown = ", ".join(str(int(image_ids[i])) for i in miss[:SHOW]) + (", ..." if len(miss) > SHOW else "")
        raise LAYOUT.error(
            f"{len(miss)} image id(s) of {folder / 'images.txt'} have no class in "
            f"{folder / 'image_class_labels.txt'} (e.g. {shown}); the two files do not belong together",
            layout=False,
        )
    image_classes = label_class_ids[order[pos]]

    paths = [folder / "images" / p for p in images.text("path")]
    if check_files:
        check_files_exist(LAYOUT, paths, str(folder / "images.txt"))
    train_ids, test_ids = first_half(LAYOUT, class_ids)
    return build_splits(LAYOUT, paths, image_classes, names, train_ids, test_ids, source=str(folder))
