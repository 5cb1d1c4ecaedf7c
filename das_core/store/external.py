"""Bring your own embeddings: an embeddings file that das_core did not make, read into the same
``EmbeddingSet`` the explorer draws from a checkpoint.

Two formats:

* ``.npz`` (``numpy.savez``): arrays ``embeddings`` (N, d) and ``labels`` (N,) (integers, or
  strings that name the classes), optional ``class_names`` (C,) naming integer labels
  ``0..C-1``, ``paths`` (N,) image files (relative to the file's folder, or absolute), and a
  0-d string ``checkpoint``: the das_core checkpoint that made the embeddings (Retrieve can
  then embed a query image).
* Parquet: a vector column (``embedding``, ``embeddings`` or ``vector``: lists of numbers),
  a label column (``label`` or ``labels``), optional ``class_name``, ``path`` (or
  ``image_path``) and ``produced`` columns (rows flagged produced, as in das_core's own
  export, are left out), and an optional ``checkpoint`` entry in the file's key-value metadata.

A file that cannot be used raises ``EmbeddingsFileError`` naming the problem (a missing array
or column, ragged vectors, NaN rows, labels that do not match) and the fix. The file is never
unpickled (``allow_pickle=False``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from das_core.data.base import DMLDataset
    from das_core.store.cache import EmbeddingSet
    from das_core.training.config import TrainConfig

SUFFIXES = (".npz", ".parquet", ".pq")
SPLIT = "file"  # the split name of a file's items: a file holds one set, not train/val/test
VECTOR_COLUMNS = ("embedding", "embeddings", "vector")
LABEL_COLUMNS = ("label", "labels")
CLASS_COLUMNS = ("class_name", "class")
PATH_COLUMNS = ("path", "image_path", "filepath", "file_path")
MAX_FILE_BYTES = 2 * 1024**3
_SHOW_ROWS = 5


class EmbeddingsFileError(ValueError):
    """An embeddings file cannot be used: the message names the file, the problem and the fix."""


@dataclass
class EmbeddingsFile:
    """The embeddings of a file, ready for the explorer.

    It offers what the explorer's pages read from a ``Checkpoint`` (``path``, ``name``,
    ``config``, ``class_names``, ``has_das``, ``metrics``, ``epoch``) so a page treats both
    alike; ``config`` is the named checkpoint's (its DAS settings are the sliders' start) or
    else the defaults. ``external`` tells them apart."""

    path: Path
    embeddings: np.ndarray  # (N, d) float32, every row finite
    labels: np.ndarray  # (N,) int64 in 0..C-1
    class_names: list[str]
    key: str  # the file's content key (``cache.file_key``): its cache folder
    paths: list[str] | None = None
    checkpoint: str | None = None
    notes: list[str] = field(default_factory=list)
    external: bool = True
    has_das: bool = False
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> str:
        """As ``Checkpoint.identity``: what the cache keys this file's entries by."""
        return self.key

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def dataset(self) -> str:
        return self.path.stem

    @property
    def config(self) -> TrainConfig:
        """The named checkpoint's config when it can be read, else the defaults; the
        embedding dimension is the file's."""
        from das_core.training.config import TrainConfig

        cfg = TrainConfig()
        if self.checkpoint is not None:
            try:
                from das_core.store.checkpoint import read_safetensors_header

                cfg = _config_of(read_safetensors_header(Path(self.checkpoint)))
            except Exception:  # the checkpoint is optional: without it, the defaults
                cfg = TrainConfig()
        d = int(self.embeddings.shape[1])
        return cfg.replace(embedding_dim=d, das_topk=min(int(cfg.das_topk), d))

    def embedding_set(self) -> EmbeddingSet:
        """The file's items as the explorer's ``EmbeddingSet`` (split ``"file"``, keyed by the
        file's content, so maps and indexes are cached like a checkpoint's)."""
        from das_core.store.cache import EmbeddingSet

        return EmbeddingSet(
            embeddings=self.embeddings,
            labels=self.labels,
            class_names=list(self.class_names),
            split=SPLIT,
            dataset=self.dataset,
            checkpoint_key=self.key,
            meta={"source": str(self.path), "paths": self.paths, "checkpoint": self.checkpoint},
        )

    def image_paths(self) -> list[Path] | None:
        """The items' image files (relative ones resolved against the file's folder), or
        ``None`` when the file names none."""
        if self.paths is None:
            return None
        base = self.path.parent
        return [Path(p) if Path(p).is_absolute() else base / p for p in self.paths]


def _config_of(header: dict[str, Any]) -> TrainConfig:
    import json

    from das_core.training.config import TrainConfig

    meta = header.get("__metadata__", {})
    return TrainConfig.from_mapping(json.loads(meta["config"]))


def is_embeddings_file(path: str | Path) -> bool:
    """Whether ``path`` has the suffix of an embeddings file (``.npz``, ``.parquet``)."""
    return Path(path).suffix.lower() in SUFFIXES


def read_embeddings_file(
    path: str | Path, *, vector_column: str | None = None, label_column: str | None = None
) -> EmbeddingsFile:
    """Read and validate an embeddings file (see the module docstring for the formats)."""
    from das_core.store.cache import file_key

    p = Path(path).expanduser()
    if not p.is_file():
        raise EmbeddingsFileError(f"{p}: no such file" if not p.exists() else f"{p} is not a regular file")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise EmbeddingsFileError(f"{p.name}: {size / 1e9:.1f} GB is over the {MAX_FILE_BYTES / 1e9:.0f} GB limit")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        parts = _read_npz(p)
    elif suffix in (".parquet", ".pq"):
        parts = _read_parquet(p, vector_column, label_column)
    else:
        raise EmbeddingsFileError(
            f"{p.name}: not an embeddings file; use a .npz (arrays embeddings, labels) or a .parquet file "
            "(a vector column and a label column)"
        )
    emb = _check_embeddings(p.name, parts["embeddings"], parts["what"])
    labels, names = _check_labels(p.name, parts["labels"], parts.get("class_names"), len(emb))
    paths = parts.get("paths")
    if paths is not None:
        paths = [str(s) for s in np.asarray(paths).reshape(-1)] if np.asarray(paths).ndim <= 1 else None
        if paths is None or len(paths) != len(emb):
            n = "a 2-D array" if paths is None else f"{len(paths):,} paths"
            raise EmbeddingsFileError(
                f"{p.name}: {n} for {len(emb):,} embeddings: give one image path per embedding, in the same "
                "order, or leave paths out"
            )
    checkpoint = parts.get("checkpoint")
    return EmbeddingsFile(
        path=p.resolve(), embeddings=emb, labels=labels, class_names=names, key=file_key(p),
        paths=paths, checkpoint=checkpoint or None, notes=list(parts.get("notes", [])),
    )


# -- formats ---------------------------------------------------------------------------------------


def _read_npz(p: Path) -> dict[str, Any]:
    import zipfile

    try:
        npz = np.load(p, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise EmbeddingsFileError(f"{p.name}: not a readable .npz file ({exc}); write it with numpy.savez") from exc
    with npz:
        found = list(npz.files)

        def get(name: str) -> np.ndarray | None:
            if name not in found:
                return None
            try:
                return np.asarray(npz[name])
            except ValueError as exc:  # an object array: allow_pickle=False refuses it
                what = "ragged vectors of different lengths?" if name == "embeddings" else "Python objects"
                raise EmbeddingsFileError(
                    f"{p.name}: the array {name!r} holds Python objects ({what}), which are not read "
                    f"(they could run code); save {'a 2-D float array, e.g. numpy.stack(vectors)' if name == 'embeddings' else 'an array of numbers or strings'}"
                ) from exc
            except (OSError, zipfile.BadZipFile, EOFError) as exc:
                raise EmbeddingsFileError(f"{p.name}: the array {name!r} is damaged ({exc}); write the file again") from exc

        for required in ("embeddings", "labels"):
            if required not in found:
                raise EmbeddingsFileError(
                    f"{p.name}: no array {required!r} (the file holds {', '.join(map(repr, found)) or 'no arrays'}); "
                    "save it with numpy.savez(path, embeddings=E, labels=y), E of shape (N, d), y of N labels"
                )
        ckpt = get("checkpoint")
        return {
            "embeddings": get("embeddings"),
            "labels": get("labels"),
            "class_names": get("class_names"),
            "paths": get("paths"),
            "checkpoint": None if ckpt is None or ckpt.size != 1 else str(ckpt.reshape(-1)[0]),
            "what": "array 'embeddings'",
        }


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, fix: str, p: Path) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise EmbeddingsFileError(f"{p.name}: no column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    lower = {c.lower(): c for c in columns}
    for c in candidates:
        if c in lower:
            return lower[c]
    raise EmbeddingsFileError(
        f"{p.name}: no {what} column (looked for {', '.join(candidates)}; the file has {', '.join(columns) or 'none'}); {fix}"
    )


def _read_parquet(p: Path, vector_column: str | None, label_column: str | None) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except (OSError, pa.ArrowException) as exc:
        raise EmbeddingsFileError(f"{p.name}: not a readable Parquet file ({exc})") from exc
    cols = list(table.column_names)
    notes: list[str] = []
    if "produced" in cols:
        flag = table.column("produced").to_numpy(zero_copy_only=False)
        produced = np.asarray(flag, dtype=bool)
        if produced.any():
            table = table.filter(pa.array(~produced))
            notes.append(f"{int(produced.sum()):,} rows flagged produced (DAS points) were left out")
    vcol = _pick(cols, vector_column, VECTOR_COLUMNS, "vector",
                 "name the column of embedding vectors 'embedding' (a list of numbers per row)", p)
    lcol = _pick(cols, label_column, LABEL_COLUMNS, "label", "add a 'label' column (a class id or name per row)", p)
    vec = table.column(vcol).combine_chunks()
    if not (pa.types.is_list(vec.type) or pa.types.is_large_list(vec.type) or pa.types.is_fixed_size_list(vec.type)):
        raise EmbeddingsFileError(
            f"{p.name}: column {vcol!r} is {vec.type}, not a list of numbers; store one vector (list of floats) per row"
        )
    if vec.null_count:
        rows = np.flatnonzero(vec.is_null().to_numpy(zero_copy_only=False))
        raise EmbeddingsFileError(
            f"{p.name}: {len(rows):,} rows have no vector (rows {_rows(rows)}); drop them or fill them in"
        )
    lengths = pc.list_value_length(vec).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        bad = int(np.flatnonzero(lengths != lengths[0])[0])
        raise EmbeddingsFileError(
            f"{p.name}: ragged vectors in column {vcol!r}: row 0 has {int(lengths[0])} values but row {bad} has "
            f"{int(lengths[bad])}; every embedding needs the same dimension (re-export from one model)"
        )
    flat = pc.list_flatten(vec)
    if not (pa.types.is_floating(flat.type) or pa.types.is_integer(flat.type)):
        raise EmbeddingsFileError(f"{p.name}: column {vcol!r} holds {flat.type} values, not numbers")
    if flat.null_count:
        raise EmbeddingsFileError(f"{p.name}: column {vcol!r} has missing values inside vectors; drop those rows")
    d = int(lengths[0]) if len(lengths) else 0
    emb = np.asarray(flat.to_numpy(zero_copy_only=False)).reshape(len(lengths), d)
    lab = table.column(lcol).combine_chunks()
    if lab.null_count:
        rows = np.flatnonzero(lab.is_null().to_numpy(zero_copy_only=False))
        raise EmbeddingsFileError(
            f"{p.name}: {len(rows):,} rows have no label in column {lcol!r} (rows {_rows(rows)}); label them or drop them"
        )
    labels = np.asarray(lab.to_numpy(zero_copy_only=False))
    class_names = None
    ccol = next((c for c in cols if c.lower() in CLASS_COLUMNS and c != lcol), None)
    if ccol is not None and labels.dtype.kind in "iu":
        class_names = _names_from_pairs(p, labels, table.column(ccol).to_pylist(), ccol)
    pcol = next((c for c in cols if c.lower() in PATH_COLUMNS), None)
    paths = None
    if pcol is not None:
        paths = ["" if v is None else str(v) for v in table.column(pcol).to_pylist()]
    meta = table.schema.metadata or {}
    ckpt = meta.get(b"checkpoint")
    return {
        "embeddings": emb,
        "labels": labels,
        "class_names": class_names,
        "paths": paths,
        "checkpoint": ckpt.decode("utf-8", "replace") if ckpt else None,
        "what": f"column {vcol!r}",
        "notes": notes,
    }


def _names_from_pairs(p: Path, labels: np.ndarray, names: list[Any], col: str) -> np.ndarray:
    """Class names ``0..max label`` from per-row ``(label, class name)`` pairs."""
    if len(labels) == 0 or labels.min() < 0:
        return np.asarray([], dtype=str)  # _check_labels reports the negative label
    out: list[str | None] = [None] * (int(labels.max()) + 1)
    for lab, name in zip(labels.tolist(), names, strict=True):
        text = "" if name is None else str(name)
        if out[lab] is None:
            out[lab] = text
        elif out[lab] != text:
            raise EmbeddingsFileError(
                f"{p.name}: label {lab} is named both {out[lab]!r} and {text!r} in column {col!r}; "
                "give each label one class name"
            )
    return np.asarray([str(lab) if n is None else n for lab, n in enumerate(out)], dtype=str)


# -- validation ------------------------------------------------------------------------------------


def _rows(rows: np.ndarray) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:_SHOW_ROWS])
    return shown + (", ..." if len(rows) > _SHOW_ROWS else "")


def _check_embeddings(name: str, arr: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype.kind not in "fiub" or a.dtype.kind == "b":
        raise EmbeddingsFileError(f"{name}: {what} holds {a.dtype} values, not numbers; save float vectors")
    if a.ndim != 2:
        hint = " (one vector: reshape it to (1, d))" if a.ndim == 1 else ""
        raise EmbeddingsFileError(f"{name}: {what} has shape {a.shape}; expected (N, d): one row per item{hint}")
    n, d = a.shape
    if n < 2 or d < 2:
        raise EmbeddingsFileError(f"{name}: {what} has shape {a.shape}; need at least 2 items of at least 2 dimensions")
    emb = np.ascontiguousarray(a, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if len(bad):
        raise EmbeddingsFileError(
            f"{name}: {len(bad):,} of {n:,} embeddings hold NaN or infinite values (rows {_rows(bad)}); drop those "
            "rows and their labels before saving (e.g. keep = numpy.isfinite(E).all(axis=1); E, y = E[keep], y[keep])"
        )
    return emb


def _check_labels(
    name: str, labels: np.ndarray, class_names: np.ndarray | None, n: int
) -> tuple[np.ndarray, list[str]]:
    y = np.asarray(labels)
    if y.ndim != 1:
        y = y.reshape(-1) if y.ndim == 2 and 1 in y.shape else y
    if y.ndim != 1:
        raise EmbeddingsFileError(f"{name}: labels have shape {y.shape}; expected one label per embedding, shape ({n},)")
    if len(y) != n:
        raise EmbeddingsFileError(
            f"{name}: {n:,} embeddings but {len(y):,} labels; give exactly one label per embedding, in the same order"
        )
    names = None if class_names is None else [str(s) for s in np.asarray(class_names).reshape(-1)]
    if y.dtype.kind in "USO":
        text = y.astype(str)
        present = sorted(set(text.tolist()))
        order = [c for c in names if c in set(present)] if names else []
        if len(order) != len(present):
            order = present
        index = {c: i for i, c in enumerate(order)}
        return np.asarray([index[t] for t in text], dtype=np.int64), order
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if len(bad):
            raise EmbeddingsFileError(
                f"{name}: {len(bad):,} labels are not whole numbers (rows {_rows(bad)}, e.g. {y[bad[0]]}); "
                "use integer class ids or class names"
            )
    elif y.dtype.kind not in "iub":
        raise EmbeddingsFileError(f"{name}: labels are {y.dtype}; use integer class ids or class names")
    y = y.astype(np.int64)
    if names is not None:
        bad = np.flatnonzero((y < 0) | (y >= len(names)))
        if len(bad):
            raise EmbeddingsFileError(
                f"{name}: {len(bad):,} labels have no class name (rows {_rows(bad)}, e.g. label {int(y[bad[0]])}; "
                f"class_names holds {len(names)}, for labels 0..{len(names) - 1}); name every class or drop class_names"
            )
        return y, names
    ids, remapped = np.unique(y, return_inverse=True)
    return remapped.astype(np.int64).reshape(-1), [str(int(c)) for c in ids]


# -- images and splits for the explorer -------------------------------------------------------------


def placeholder_dataset(ef: EmbeddingsFile) -> DMLDataset:
    """The file's items as a dataset whose images are grey placeholders (a file without image
    paths, or with paths the app may not read): the pages draw the same, without pictures."""
    from das_core.data.base import ArrayDataset

    grey = np.broadcast_to(np.full((1, 8, 8), 160, np.uint8), (len(ef), 8, 8))
    return ArrayDataset(ef.dataset, SPLIT, grey, ef.labels, ef.class_names, source=str(ef.path))


def file_dataset(ef: EmbeddingsFile, allowed_roots: list[Path] | None = None) -> DMLDataset | None:
    """The file's items over their image files, or ``None`` when it names no images or (with
    ``allowed_roots``) when an image lies outside those folders (symlinks followed)."""
    from das_core.data.base import FileDataset

    files = ef.image_paths()
    if files is None:
        return None
    if allowed_roots is not None:
        import os

        try:
            common = Path(os.path.commonpath([str(p.resolve()) for p in files]))
        except ValueError:  # mixed drives / relative and absolute
            return None
        roots = [r.resolve() for r in allowed_roots]
        if not any(common == r or r in common.parents for r in roots):
            return None
    return FileDataset(ef.dataset, SPLIT, files, ef.labels, ef.class_names)


@dataclass
class FileSplits:
    """An embeddings file's one set of items where the pages expect a dataset's splits."""

    name: str
    dataset: DMLDataset
    has_images: bool

    def get(self, split: str) -> DMLDataset:
        return self.dataset

    def available(self) -> list[str]:
        return [SPLIT]


def file_splits(ef: EmbeddingsFile, allowed_roots: list[Path] | None = None) -> FileSplits:
    """``FileSplits`` over the file's images where it names readable ones, else placeholders."""
    ds = file_dataset(ef, allowed_roots)
    return FileSplits(ef.dataset, ds if ds is not None else placeholder_dataset(ef), ds is not None)
