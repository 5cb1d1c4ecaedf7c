"""Export what the Explore page shows to the tools people already use.

* **Parquet** (``embeddings.parquet``; pandas, FiftyOne, Embedding Atlas): one row per point,
  columns ``vector`` (list of float32), ``label``, ``class_name``, ``image_id`` (the item's
  index in its split; empty for produced points), ``path`` (the image file, where the
  dataset has files), ``x`` / ``y`` (the UMAP map the Explore page draws), ``produced``
  (``True`` for points DAS produced) and ``anchor`` (the real point a produced one came from).
  The file's key-value metadata holds ``das_explorer`` (JSON: source, split, DAS settings)
  and, for a checkpoint, ``checkpoint`` (so reading it back names the model).
* **TensorBoard projector** (a folder for ``tensorboard --logdir DIR``): ``tensors.tsv``,
  ``metadata.tsv`` (with a header: class name, label, image id, produced), ``sprite.png``
  (one thumbnail per point, a produced point shows its anchor's image) and
  ``projector_config.pbtxt``.

``python -m das_core export CKPT_OR_RUN --split test --format parquet --out DIR`` runs
``export_source``; the app's download button calls ``parquet_bytes`` / ``tensorboard_zip``.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

    from das_core.data.base import DMLDataset
    from das_core.explorer.umap_fit import MapResult
    from das_core.store.cache import EmbeddingSet

Format = Literal["parquet", "tensorboard"]
FORMATS: tuple[Format, ...] = ("parquet", "tensorboard")
PARQUET_NAME = "embeddings.parquet"
TENSORS_TSV = "tensors.tsv"
METADATA_TSV = "metadata.tsv"
SPRITE_PNG = "sprite.png"
PROJECTOR_CONFIG = "projector_config.pbtxt"
SPRITE_MAX_SIDE = 8192  # TensorBoard's projector refuses larger sprite images
SPRITE_CELL = 64


@dataclass
class ExportTable:
    """The points to export: the real points of a set (all of them) and, optionally, the
    points DAS produced from some of them, in that order."""

    vectors: np.ndarray  # (M, d) float32
    labels: np.ndarray  # (M,) int64
    class_names: list[str]
    image_id: np.ndarray  # (M,) int64: index in the split, -1 for produced points
    anchor: np.ndarray  # (M,) int64: the anchor of a produced point, -1 for real ones
    produced: np.ndarray  # (M,) bool
    xy: np.ndarray | None = None  # (M, 2) float32 map positions
    paths: list[str] | None = None  # the real items' image files, by image id
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def item(self) -> np.ndarray:
        """``(M,)`` the item whose image shows each point: its own, or its anchor's."""
        return np.where(self.produced, self.anchor, self.image_id)


def export_table(
    es: EmbeddingSet,
    *,
    coords: np.ndarray | None = None,
    produced: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    produced_xy: np.ndarray | None = None,
    paths: list[str] | None = None,
    meta: dict[str, Any] | None = None,
    ids: np.ndarray | None = None,
) -> ExportTable:
    """The export of the real points ``ids`` of ``es`` (default: all), their map positions
    ``coords`` ``(N, 2)`` (of every point of ``es``), and the points DAS ``produced`` as
    ``(embeddings (P, d), labels, anchor ids)`` placed at ``produced_xy``."""
    total = len(es)
    rows = np.arange(total, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= total):
        raise ValueError(f"ids must lie in 0..{total - 1}")
    n = len(rows)
    if coords is not None and np.asarray(coords).shape != (total, 2):
        raise ValueError(f"coords must be ({total}, 2), got {np.asarray(coords).shape}")
    if paths is not None and len(paths) != total:
        raise ValueError(f"{len(paths)} paths for {total} points")
    vec, lab = [es.embeddings[rows]], [es.labels[rows]]
    image_id, anchor = [rows], [np.full(n, -1, np.int64)]
    flag = [np.zeros(n, bool)]
    xy = None if coords is None else [np.asarray(coords, np.float32)[rows]]
    if produced is not None and len(produced[0]):
        p_emb, p_lab, p_anchor = (np.asarray(a) for a in produced)
        p = len(p_emb)
        if p_emb.shape[1:] != es.embeddings.shape[1:] or p_lab.shape != (p,) or p_anchor.shape != (p,):
            raise ValueError("produced embeddings, labels and anchors do not match the set")
        vec.append(p_emb)
        lab.append(p_lab)
        image_id.append(np.full(p, -1, np.int64))
        anchor.append(p_anchor.astype(np.int64))
        flag.append(np.ones(p, bool))
        if xy is not None:
            if produced_xy is None or np.asarray(produced_xy).shape != (p, 2):
                raise ValueError(f"produced_xy must be ({p}, 2) when coords are given")
            xy.append(np.asarray(produced_xy, np.float32))
    return ExportTable(
        vectors=np.ascontiguousarray(np.concatenate(vec), dtype=np.float32),
        labels=np.concatenate(lab).astype(np.int64),
        class_names=list(es.class_names),
        image_id=np.concatenate(image_id),
        anchor=np.concatenate(anchor),
        produced=np.concatenate(flag),
        xy=None if xy is None else np.concatenate(xy),
        paths=paths,
        meta={"split": es.split, "dataset": es.dataset, **(meta or {})},
    )


# -- Parquet ---------------------------------------------------------------------------------------


def to_arrow(table: ExportTable) -> pa.Table:
    """The export as an Arrow table (see the module docstring for the columns)."""
    import pyarrow as pa

    m, d = table.vectors.shape
    flat = pa.array(table.vectors.reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, (m + 1) * d, d, dtype=np.int32) if m else np.zeros(1, np.int32))
    names = np.asarray(table.class_names, dtype=object)
    real = ~table.produced
    cols: dict[str, Any] = {
        "vector": pa.ListArray.from_arrays(offsets, flat),
        "label": pa.array(table.labels, type=pa.int64()),
        "class_name": pa.array(names[table.labels].tolist() if m else [], type=pa.string()),
        "image_id": pa.array(table.image_id, type=pa.int64(), mask=~real),
    }
    if table.paths is not None:
        item_paths = [table.paths[i] if ok and i >= 0 else None for i, ok in zip(table.image_id.tolist(), real.tolist(), strict=True)]
        cols["path"] = pa.array(item_paths, type=pa.string())
    if table.xy is not None:
        cols["x"] = pa.array(table.xy[:, 0], type=pa.float32())
        cols["y"] = pa.array(table.xy[:, 1], type=pa.float32())
    cols["produced"] = pa.array(table.produced, type=pa.bool_())
    cols["anchor"] = pa.array(table.anchor, type=pa.int64(), mask=real)
    meta = {"das_explorer": json.dumps(table.meta, default=str)}
    if table.meta.get("checkpoint"):
        meta["checkpoint"] = str(table.meta["checkpoint"])
    return pa.table(cols).replace_schema_metadata(meta)


def parquet_bytes(table: ExportTable) -> bytes:
    """The Parquet file of the export, in memory (the app's download button)."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(to_arrow(table), buf, compression="zstd")
    return buf.getvalue()


def write_parquet(table: ExportTable, path: str | Path) -> Path:
    """Write the export as one Parquet file (atomically)."""
    from das_core.store.io import atomic_write_bytes

    out = Path(path)
    atomic_write_bytes(out, parquet_bytes(table))
    return out


# -- TensorBoard projector -------------------------------------------------------------------------


def _tsv_cell(value: Any) -> str:
    return " ".join(str(value).replace("\t", " ").splitlines()) or " "


def _pbtxt_string(text: str) -> str:
    """A protobuf text-format string literal (JSON's escapes are a subset it accepts; non-ASCII
    as UTF-8 octal escapes so the file stays ASCII)."""
    return '"' + "".join(
        c if 32 <= ord(c) < 127 and c not in '"\\' else (f"\\{c}" if c in '"\\' else "".join(f"\\{b:03o}" for b in c.encode()))
        for c in text
    ) + '"'


def sprite_geometry(count: int, cell: int = SPRITE_CELL) -> tuple[int, int]:
    """``(cells per row, cell px)`` of a square TensorBoard sprite of ``count`` thumbnails
    that stays within ``SPRITE_MAX_SIDE`` px a side."""
    per_row = max(1, math.ceil(math.sqrt(max(1, count))))
    return per_row, max(1, min(int(cell), SPRITE_MAX_SIDE // per_row))


def write_sprite(table: ExportTable, images: DMLDataset, path: str | Path, cell: int | None = None) -> int:
    """Write the projector's sprite: one thumbnail per point (a produced point shows its
    anchor's image), row by row in point order; returns the cell size in px."""
    from das_core.explorer.thumbs import build_sprites, default_size

    per_row, size = sprite_geometry(len(table), cell if cell is not None else default_size(images))
    items = images.subset(table.item, relabel=False)
    with tempfile.TemporaryDirectory(prefix="das-sprite-") as tmp:
        info = build_sprites(items, tmp, size=size, per_row=per_row)
        shutil.copyfile(Path(tmp) / info.files[0], path)
    return size


def write_tensorboard(table: ExportTable, out_dir: str | Path, *, images: DMLDataset | None = None,
                      name: str = "das-explorer") -> Path:
    """Write the projector files into ``out_dir`` (created) and return the config's path.
    Without ``images`` there is no sprite."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savetxt(out / TENSORS_TSV, table.vectors, fmt="%.7g", delimiter="\t")
    names = table.class_names
    lines = ["class_name\tlabel\timage_id\tproduced\tanchor"]
    for lab, iid, flag, anc in zip(table.labels.tolist(), table.image_id.tolist(), table.produced.tolist(),
                                   table.anchor.tolist(), strict=True):
        lines.append("\t".join([_tsv_cell(names[lab]), str(lab), "" if flag else str(iid),
                                "true" if flag else "false", str(anc) if flag else ""]))
    (out / METADATA_TSV).write_text("\n".join(lines) + "\n", encoding="utf-8")
    sprite = ""
    if images is not None:
        size = write_sprite(table, images, out / SPRITE_PNG)
        sprite = (f"  sprite {{\n    image_path: {_pbtxt_string(SPRITE_PNG)}\n"
                  f"    single_image_dim: {size}\n    single_image_dim: {size}\n  }}\n")
    config = (f"embeddings {{\n  tensor_name: {_pbtxt_string(name)}\n  tensor_path: {_pbtxt_string(TENSORS_TSV)}\n"
              f"  metadata_path: {_pbtxt_string(METADATA_TSV)}\n{sprite}}}\n")
    (out / PROJECTOR_CONFIG).write_text(config, encoding="utf-8")
    return out / PROJECTOR_CONFIG


def tensorboard_zip(table: ExportTable, *, images: DMLDataset | None = None, name: str = "das-explorer") -> bytes:
    """The projector files as a zip (the app's download button); unzip and run
    ``tensorboard --logdir`` on the folder."""
    buf = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="das-projector-") as tmp:
        write_tensorboard(table, tmp, images=images, name=name)
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(Path(tmp).iterdir()):
                zf.write(f, f.name)
    return buf.getvalue()


# -- from a checkpoint or an embeddings file (the CLI) ---------------------------------------------


@dataclass
class ExportSource:
    """What ``export_source`` gathered: the set, its map, and the images for a sprite."""

    emb_set: EmbeddingSet
    map: MapResult
    table: ExportTable
    images: DMLDataset | None


def gather(
    source: str | Path,
    split: str = "test",
    *,
    das_anchors_per_class: int = 50,
    r_s: float | None = None,
    r_b: float | None = None,
    data_root: str | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> ExportSource:
    """The points of ``split`` under a checkpoint / run folder (embedded with its model), or of
    an embeddings file (its one set), on the same UMAP map the Explore page shows, with the
    points DAS produces from up to ``das_anchors_per_class`` anchors of every class at the
    source's (or the given) ``r_s`` / ``r_b`` (0: no DAS points), placed into the map as
    Explore places them."""
    from das_core.data.base import FileDataset
    from das_core.explorer.analysis import das_state_for, produce_for_anchors, select_anchors
    from das_core.explorer.maps import get_map
    from das_core.explorer.umap_fit import map_placer
    from das_core.store.external import is_embeddings_file, read_embeddings_file

    images: DMLDataset | None
    src: Any
    if is_embeddings_file(source):
        src = read_embeddings_file(source)
        es = src.embedding_set()
        mp = get_map(es, seed=seed)
        files = src.image_paths()
        images = None if files is None else FileDataset(es.dataset, es.split, files, es.labels, es.class_names)
        paths = src.paths
        meta: dict[str, Any] = {"source": str(src.path), "checkpoint": src.checkpoint}
    else:
        from das_core.explorer.maps import explorer_map
        from das_core.store.checkpoint import load_checkpoint
        from das_core.training.loop import load_splits_for

        src = load_checkpoint(source)
        splits = load_splits_for(src.config, data_root)
        es, mp = explorer_map(src, split, data_root=data_root, device=device, splits=splits)
        images = splits.get(split)
        paths = [str(p) for p in images.paths] if isinstance(images, FileDataset) else None
        meta = {"source": str(src.path), "checkpoint": str(src.path)}
    cfg = src.config
    changes = {k: v for k, v in (("das_r_s", r_s), ("das_r_b", r_b)) if v is not None}
    if changes:
        cfg = cfg.replace(**changes)  # validated: one rule per parameter range
    produced = produced_xy = None
    das, _ = das_state_for(src, es) if das_anchors_per_class > 0 else (None, "")
    use_dfs, use_mts = cfg.das_halves()
    if das is not None:
        anchors = select_anchors(es.labels, das_anchors_per_class, seed=seed)
        p_emb, p_lab, p_anchor, _ = produce_for_anchors(
            das, es.embeddings, es.labels, anchors, r_s=cfg.das_r_s, r_b=cfg.das_r_b,
            rounds=cfg.das_num_produce, topk=min(cfg.das_topk, es.dim), use_dfs=use_dfs, use_mts=use_mts, seed=seed,
        )
        produced = (p_emb, p_lab, p_anchor)
        produced_xy = map_placer(mp, es.embeddings)(p_emb)
    meta.update({"map": mp.method, "map_seed": mp.seed, "das_anchors_per_class": das_anchors_per_class,
                 "r_s": cfg.das_r_s, "r_b": cfg.das_r_b, "T": cfg.das_num_produce, "K": min(cfg.das_topk, es.dim),
                 "dfs": use_dfs, "mts": use_mts})
    table = export_table(es, coords=mp.coords, produced=produced, produced_xy=produced_xy, paths=paths, meta=meta)
    return ExportSource(emb_set=es, map=mp, table=table, images=images)


def export_source(source: str | Path, out: str | Path, fmt: Format, split: str = "test", **options: Any) -> Path:
    """Export ``split`` of a checkpoint, run folder or embeddings file into the folder ``out``:
    ``embeddings.parquet`` or the TensorBoard projector files. Returns the file written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: use {' or '.join(FORMATS)}")
    got = gather(source, split, **options)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        return write_parquet(got.table, out_dir / PARQUET_NAME)
    return write_tensorboard(got.table, out_dir, images=got.images, name=f"{got.emb_set.dataset}-{got.emb_set.split}")
