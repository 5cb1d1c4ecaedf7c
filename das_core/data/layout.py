"""Shared helpers for datasets published as files in a fixed on-disk layout (CUB, Cars, SOP,
image folders): locating the dataset folder, reading whitespace-separated index files with
line-numbered errors, checking that listed images exist, and building class-disjoint splits.

Every error is a ``DatasetError`` naming the dataset, what was expected where, and how to fix it.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from das_core.data.base import DatasetError, DatasetSplits, FileDataset, default_data_dir, split_by_classes

# How many offending entries an error message lists before "...".
SHOW = 3


@dataclass(frozen=True)
class Layout:
    """How one dataset lies on disk: used to locate it and to word every error about it."""

    title: str  # human name, e.g. "CUB-200-2011"
    name: str  # registry name, e.g. "cub200" (also the default folder under default_data_dir())
    folder: str | None  # the official top folder ("CUB_200_2011"); None when files lie in the root
    required: tuple[str, ...]  # entries that must exist inside the dataset folder
    description: str  # the layout in words, e.g. "<root>/CUB_200_2011/{images.txt, ...}"
    fix: str  # how to get it, e.g. "Download with `python -m das_core data download ...`"
    official: bool = True  # a published layout ("expected the official layout ...")

    def error(self, problem: str, *, layout: bool = True) -> DatasetError:
        """``"<title>: <problem>; expected the official layout <description>. <fix>"``."""
        msg = f"{self.title}: {problem}"
        if layout:
            msg += f"; expected {'the official layout' if self.official else 'the layout'} {self.description}"
        return DatasetError(f"{msg}. {self.fix}")

    def root(self, data_root: str | Path | None) -> Path:
        """``data_root`` as an existing folder (``None``: ``default_data_dir()/<name>``)."""
        if data_root is None:
            root = default_data_dir() / self.name
            where = f"the default data folder {root} (pass --data-root DIR or set $DAS_DATA_DIR)"
        else:
            root = Path(data_root).expanduser()
            where = f"data root {root}"
        if not root.exists():
            raise self.error(f"{where} does not exist")
        if not root.is_dir():
            raise self.error(f"{where} is not a folder")
        return root

    def locate(self, data_root: str | Path | None) -> Path:
        """The dataset folder: ``data_root/<folder>`` or ``data_root`` itself, whichever holds
        all ``required`` entries; otherwise a ``DatasetError`` naming the first missing one."""
        root = self.root(data_root)
        if self.folder is None:
            candidates = [root]
        elif root.name == self.folder:
            candidates = [root, root / self.folder]
        else:
            candidates = [root / self.folder, root]
        scores = [sum((c / r).exists() for r in self.required) for c in candidates]
        for cand, score in zip(candidates, scores, strict=True):
            if score == len(self.required):
                return cand
        best = candidates[scores.index(max(scores))]
        missing = next(r for r in self.required if not (best / r).exists())
        raise self.error(f"{best / missing} not found")


@dataclass
class IndexTable:
    """The rows of a whitespace-separated index file; the last column keeps any spaces."""

    layout: Layout
    path: Path
    columns: tuple[str, ...]
    rows: list[list[str]]
    lines: list[int]  # 1-based line number of each row

    def __len__(self) -> int:
        return len(self.rows)

    def _col(self, column: str) -> int:
        return self.columns.index(column)

    def text(self, column: str) -> list[str]:
        i = self._col(column)
        return [r[i] for r in self.rows]

    def ints(self, column: str, *, unique: bool = False) -> np.ndarray:
        """Column ``column`` as int64; a non-integer (or, with ``unique``, a repeated) value is
        an error naming the file and line."""
        i = self._col(column)
        try:
            values = np.array([int(r[i]) for r in self.rows], dtype=np.int64)
        except ValueError:
            for r, line in zip(self.rows, self.lines, strict=True):
                try:
                    int(r[i])
                except ValueError:
                    raise self.line_error(line, f"{column} must be an integer, got {r[i]!r}") from None
            raise  # pragma: no cover - int() failed above, so the loop raised
        if unique and len(values):
            uniq, counts = np.unique(values, return_counts=True)
            if (counts > 1).any():
                dup = int(uniq[np.argmax(counts > 1)])
                rows = np.flatnonzero(values == dup)
                raise self.line_error(
                    self.lines[rows[1]], f"duplicate {column} {dup} (first on line {self.lines[rows[0]]})"
                )
        return values

    def line_error(self, line: int, problem: str) -> DatasetError:
        return self.layout.error(f"{self.path} line {line}: {problem}", layout=False)


def read_index(layout: Layout, path: Path, columns: Sequence[str], *, header: bool = False) -> IndexTable:
    """Read ``path``: one row of ``len(columns)`` whitespace-separated fields per line (blank
    lines skipped). With ``header`` the first non-blank line must name the columns."""
    cols = tuple(columns)
    expected = " ".join(f"<{c}>" for c in cols)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise layout.error(f"{path} not found") from None
    except UnicodeDecodeError as exc:
        raise layout.error(f"{path} is not a text file ({exc})") from None
    except OSError as exc:
        raise layout.error(f"cannot read {path}: {exc.strerror or exc}", layout=False) from exc
    table = IndexTable(layout, path, cols, [], [])
    header_pending = header
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(None, len(cols) - 1)
        if header_pending:
            header_pending = False
            if [f.lower() for f in line.split()] != [c.lower() for c in cols]:
                raise table.line_error(
                    lineno, f"expected the header {' '.join(cols)!r}, got {line.strip()!r}"
                )
            continue
        if len(fields) != len(cols):
            raise table.line_error(
                lineno, f"expected {len(cols)} fields {expected!r}, got {len(fields)}: {line.strip()!r}"
            )
        table.rows.append(fields)
        table.lines.append(lineno)
    if not table.rows:
        raise layout.error(f"{path} lists nothing (expected lines {expected!r})", layout=False)
    return table


def check_files_exist(layout: Layout, paths: Sequence[Path], listed_in: str) -> None:
    """Raise if any of ``paths`` is missing, saying how many and which. Lists each parent
    folder once instead of calling ``stat`` on every file (120k files in SOP)."""
    by_dir: dict[Path, list[int]] = defaultdict(list)
    for i, p in enumerate(paths):
        by_dir[p.parent].append(i)
    suspects: list[int] = []
    for folder, idxs in by_dir.items():
        try:
            names = set(os.listdir(folder))
        except OSError:
            names = set()
        suspects.extend(i for i in idxs if paths[i].name not in names)
    # listdir's spelling may differ from the index's on case-insensitive file systems
    missing = sorted(i for i in suspects if not paths[i].is_file())
    if missing:
        examples = ", ".join(str(paths[i]) for i in missing[:SHOW])
        more = ", ..." if len(missing) > SHOW else ""
        raise layout.error(
            f"{len(missing)} of {len(paths)} images listed in {listed_in} are missing "
            f"(e.g. {examples}{more}); the download or extraction looks incomplete",
            layout=False,
        )


def first_half(layout: Layout, class_ids: Sequence[int] | np.ndarray) -> tuple[list[int], list[int]]:
    """The first half of ``class_ids`` (in the given order, rounded down) trains, the rest test."""
    ids = [int(c) for c in class_ids]
    if len(ids) < 2:
        raise layout.error(
            f"found {len(ids)} class(es); need at least 2 for class-disjoint train/test splits"
        )
    k = len(ids) // 2
    return ids[:k], ids[k:]


def unique_names(names: Mapping[int, str]) -> dict[int, str]:
    """``names`` with any repeated name suffixed by its class id, so that names identify classes."""
    seen: dict[str, int] = defaultdict(int)
    for n in names.values():
        seen[n] += 1
    return {cid: (f"{n} (class {cid})" if seen[n] > 1 else n) for cid, n in names.items()}


def build_splits(
    layout: Layout,
    paths: Sequence[Path],
    class_ids: np.ndarray,
    class_names: Mapping[int, str],
    train_ids: Sequence[int],
    test_ids: Sequence[int],
    *,
    source: str,
    styles: Sequence[str] | None = None,
) -> DatasetSplits:
    """Class-disjoint train/test ``FileDataset``s: item ``i`` is ``paths[i]`` of class
    ``class_ids[i]`` (an id in ``class_names``), in style ``styles[i]`` if given; labels are
    contiguous per split, in class-id order. Classes listed but without images are left out
    (and noted)."""
    ids = np.asarray(class_ids, dtype=np.int64)
    order = np.array(sorted(class_names), dtype=np.int64)
    pos = np.searchsorted(order, ids)
    bad = (pos >= len(order)) | (order[np.minimum(pos, len(order) - 1)] != ids)
    if bad.any():  # loaders validate ids first; this guards the helper itself
        raise layout.error(f"images of unknown class id {int(ids[np.argmax(bad)])}", layout=False)
    names = unique_names(class_names)
    full = FileDataset(layout.name, "all", paths, pos, [names[int(c)] for c in order], styles=styles)
    index = {int(c): k for k, c in enumerate(order)}
    train, test = split_by_classes(full, [index[c] for c in train_ids], [index[c] for c in test_ids])
    for split, ds in (("train", train), ("test", test)):
        if len(ds) == 0:
            raise layout.error(f"the {split} split has no images", layout=False)
    notes = []
    empty = sorted(set(int(c) for c in order) - set(int(c) for c in np.unique(ids)))
    if empty:
        shown = ", ".join(names[c] for c in empty[:SHOW]) + (", ..." if len(empty) > SHOW else "")
        notes.append(
            f"{layout.title}: {len(empty)} listed class(es) have no images and were left out: {shown}"
        )
    return DatasetSplits(layout.name, train, test, source=source, notes=notes)
