"""CARS196 (Stanford Cars) in the layout of its all-in-one annotation file.

``<root>/{cars_annos.mat, car_ims/000001.jpg ...}``: ``cars_annos.mat`` holds a struct
array ``annotations`` (fields ``relative_im_path`` such as ``car_ims/000001.jpg``, the bounding
box, ``class`` 1..196, ``test`` 0/1) and a cell array ``class_names``; ``car_ims/`` is the
extracted ``car_ims.tgz``.

Split (the standard zero-shot protocol): classes 1-98 train, 99-196 test (8,054 / 8,131
images), i.e. the first / second half of ``class_names``; the file's own ``test`` flag (a
split within each class) is not used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from das_core.data.base import DatasetSplits
from das_core.data.layout import Layout, build_splits, check_files_exist, first_half

LAYOUT = Layout(
    title="CARS196",
    name="cars196",
    folder=None,
    required=("cars_annos.mat", "car_ims"),
    description="<root>/{cars_annos.mat, car_ims/000001.jpg, ...}",
    fix=(
        "Download with `python -m das_core data download cars196 --root DIR`, or put cars_annos.mat "
        "and the extracted car_ims.tgz (the car_ims/ folder) into DIR"
    ),
)
ANNOTATIONS = "cars_annos.mat"


def locate_cars196(data_root: str | Path | None = None) -> Path:
    """The folder holding ``cars_annos.mat`` and ``car_ims/``; ``DatasetError`` otherwise."""
    return LAYOUT.locate(data_root)


def _scalar(value: Any) -> Any:
    """Unwrap MATLAB's nesting (``array([[5]])``, ``array(['x'])``) down to one Python value."""
    while isinstance(value, np.ndarray):
        if value.size == 0:
            return ""
        value = value.reshape(-1)[0]
    return value.item() if isinstance(value, np.generic) else value


def read_cars_annotations(path: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """``(relative image paths, class ids 1..C, class names)`` from ``cars_annos.mat``."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except Exception as exc:  # scipy raises ValueError, MatReadError, OSError... on a bad file
        raise LAYOUT.error(f"cannot read {path} as a MATLAB file ({exc})", layout=False) from exc
    ann = mat.get("annotations")
    fields = (ann.dtype.names or ()) if isinstance(ann, np.ndarray) else ()
    if not isinstance(ann, np.ndarray) or not {"relative_im_path", "class"} <= set(fields):
        found = ", ".join(k for k in mat if not k.startswith("__")) or "nothing"
        raise LAYOUT.error(
            f"{path} has no struct array 'annotations' with fields relative_im_path and class "
            f"(found: {found}); the devkit's cars_train_annos.mat / cars_meta.mat are a different "
            "format: use cars_annos.mat from ai.stanford.edu/~jkrause/car196/"
        )
    if "class_names" not in mat:
        raise LAYOUT.error(f"{path} has no cell array 'class_names'")
    records = ann.reshape(-1)
    rel_paths = [str(_scalar(r["relative_im_path"])) for r in records]
    try:
        classes = np.array([int(_scalar(r["class"])) for r in records], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise LAYOUT.error(f"{path}: a 'class' value is not an integer ({exc})", layout=False) from exc
    names = [str(_scalar(n)).strip() for n in np.asarray(mat["class_names"], dtype=object).reshape(-1)]
    if not records.size:
        raise LAYOUT.error(f"{path} lists no annotations", layout=False)
    bad = np.flatnonzero((classes < 1) | (classes > len(names)))
    if len(bad):
        i = int(bad[0])
        raise LAYOUT.error(
            f"{path}: annotation {i + 1} ({rel_paths[i]}) has class {int(classes[i])}, outside 1..{len(names)} "
            f"(the file has {len(names)} class_names)",
            layout=False,
        )
    return rel_paths, classes, names


def load_cars196(data_root: str | Path | None = None, *, check_files: bool = True) -> DatasetSplits:
    """CARS196 as class-disjoint train (first half of the classes) / test (second half)."""
    folder = locate_cars196(data_root)
    rel_paths, classes, names = read_cars_annotations(folder / ANNOTATIONS)
    paths = [folder / p for p in rel_paths]
    if check_files:
        check_files_exist(LAYOUT, paths, str(folder / ANNOTATIONS))
    class_names = {i + 1: (n or f"class {i + 1}") for i, n in enumerate(names)}
    train_ids, test_ids = first_half(LAYOUT, list(class_names))
    return build_splits(LAYOUT, paths, classes, class_names, train_ids, test_ids, source=str(folder))
