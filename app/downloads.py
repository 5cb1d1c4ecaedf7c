"""The Explore page's download buttons: what the map shows (real points, their map positions and
the produced points) as Parquet or as TensorBoard projector files, made only when clicked."""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st

from app import state


def export_buttons(ckpt: Any, es: Any, split: str, ids: np.ndarray, coords: np.ndarray,
                   produced: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None,
                   settings: dict[str, Any]) -> None:
    """Two download buttons: ``produced`` is ``(embeddings, labels, anchor ids, map xy)``."""
    from das_core.explorer.export import export_table, parquet_bytes, tensorboard_zip

    ext = state.is_external(ckpt)
    images: Any = None
    try:
        sp = state.splits(ckpt)
        if not ext or sp.has_images:
            images = sp.get(split)
    except Exception:  # thumbnails are a convenience: the export works without a sprite
        images = None
    paths = getattr(ckpt, "paths", None) if ext else getattr(images, "paths", None)
    meta = {"source": str(ckpt.path), "checkpoint": (getattr(ckpt, "checkpoint", None) if ext else str(ckpt.path)),
            **settings}

    def table() -> Any:
        p = produced if produced is not None and len(produced[0]) else None
        return export_table(es, coords=coords, ids=ids, paths=None if paths is None else [str(x) for x in paths],
                            produced=None if p is None else p[:3], produced_xy=None if p is None else p[3], meta=meta)

    stem = f"{es.dataset}-{split}"
    c1, c2 = st.columns(2)
    c1.download_button("Download what is shown (Parquet)", lambda: parquet_bytes(table()),
                       file_name=f"{stem}.parquet", mime="application/vnd.apache.parquet", key="export_parquet",
                       on_click="ignore", help="vector, label, class_name, image_id, path, map x / y, produced: "
                       "opens in pandas, FiftyOne and Embedding Atlas")
    c2.download_button("Download for TensorBoard's projector (.zip)",
                       lambda: tensorboard_zip(table(), images=images, name=stem), file_name=f"{stem}-projector.zip",
                       mime="application/zip", key="export_tensorboard", on_click="ignore",
                       help="tensors.tsv, metadata.tsv, sprite.png, projector_config.pbtxt: unzip into a folder "
                            "and run tensorboard --logdir on it")
