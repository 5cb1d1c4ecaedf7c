"""Stanford Online Products (SOP) in its official layout.

``<root>/Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, <category>_final/<image>.JPG}``
as extracted from ``Stanford_Online_Products.zip``; ``data_root`` may also be that folder
itself. Each index file starts with the header ``image_id class_id super_class_id path``.

Split: the official one -- the classes of ``Ebay_train.txt`` train (11,318 classes, 59,551
images), those of ``Ebay_test.txt`` test (11,316 classes, 60,502 images). Class names are
``"<category> #<class_id>"``, e.g. ``"coffee maker #11319"``, the category taken from the
first folder of the image path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from das_core.data.base import DatasetSplits
from das_core.data.layout import SHOW, IndexTable, Layout, build_splits, check_files_exist, read_index

LAYOUT = Layout(
    title="Stanford Online Products",
    name="sop",
    folder="Stanford_Online_Products",
    required=("Ebay_train.txt", "Ebay_test.txt"),
    description="<root>/Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, <category>_final/...}",
    fix=(
        "Download with `python -m das_core data download sop --root DIR` or extract "
        "Stanford_Online_Products.zip into DIR"
    ),
)
COLUMNS = ("image_id", "class_id", "super_class_id", "path")


def locate_sop(data_root: str | Path | None = None) -> Path:
    """The ``Stanford_Online_Products`` folder; ``DatasetError`` if the layout is wrong."""
    return LAYOUT.locate(data_root)


def category(path: str) -> str:
    """``"coffee_maker_final/1_0.JPG"`` -> ``"coffee maker"``."""
    head = path.replace("\\", "/").split("/", 1)[0] if "/" in path or "\\" in path else ""
    return head.removesuffix("_final").replace("_", " ") or "product"


def _read_split(folder: Path, filename: str) -> tuple[IndexTable, np.ndarray, dict[int, str]]:
    table = read_index(LAYOUT, folder / filename, COLUMNS, header=True)
    class_ids = table.ints("class_id")
    table.ints("image_id")  # validated, not used
    paths = table.text("path")
    uniq, first = np.unique(class_ids, return_index=True)
    names = {int(c): f"{category(paths[i])} #{int(c)}" for c, i in zip(uniq, first, strict=True)}
    return table, class_ids, names


def load_sop(data_root: str | Path | None = None, *, check_files: bool = True) -> DatasetSplits:
    """SOP as class-disjoint train (``Ebay_train.txt``) / test (``Ebay_test.txt``) splits."""
    folder = locate_sop(data_root)
    train_table, train_classes, train_names = _read_split(folder, "Ebay_train.txt")
    test_table, test_classes, test_names = _read_split(folder, "Ebay_test.txt")
    shared = sorted(set(train_names) & set(test_names))
    if shared:
        shown = ", ".join(map(str, shared[:SHOW])) + (", ..." if len(shared) > SHOW else "")
        raise LAYOUT.error(
            f"{len(shared)} class_id(s) appear in both Ebay_train.txt and Ebay_test.txt (e.g. {shown}); "
            "the official splits are class-disjoint",
            layout=False,
        )
    paths = [folder / p for p in train_table.text("path") + test_table.text("path")]
    if check_files:
        check_files_exist(LAYOUT, paths, f"{folder / 'Ebay_train.txt'} and Ebay_test.txt")
    return build_splits(
        LAYOUT,
        paths,
        np.concatenate([train_classes, test_classes]),
        {**train_names, **test_names},
        sorted(train_names),
        sorted(test_names),
        source=str(folder),
    )
