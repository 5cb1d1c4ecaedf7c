"""Where things live and how heavy things are cached, for every page.

Heavy work is cached at the boundary: checkpoints, models, datasets and indexes with
``st.cache_resource``; embeddings and maps with ``st.cache_data`` on top of das_core's
on-disk cache (keyed by checkpoint content and split), so reopening is instant.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import streamlit as st

from das_core.runs import REPO_ROOT, default_runs_root

if TYPE_CHECKING:
    from das_core.cache import EmbeddingSet
    from das_core.checkpoint import Checkpoint
    from das_core.data import DatasetSplits
    from das_core.projection import MapResult

STATIC_CACHE = REPO_ROOT / "static" / "cache"
STATIC_URL = "/app/static/cache"
QUERY_SAMPLES = REPO_ROOT / "assets" / "queries"


def runs_root() -> Path:
    return default_runs_root()


def upload_dir() -> Path:
    return runs_root() / ".uploads"


def device_name() -> str:
    """``cuda`` when a GPU is visible to the app, else ``cpu`` (env DAS_APP_DEVICE overrides)."""
    forced = os.environ.get("DAS_APP_DEVICE")
    if forced:
        return forced
    from das_core.embed import resolve_device

    return resolve_device("auto").type


@dataclass(frozen=True)
class Choice:
    label: str
    path: str
    kind: str  # demo | run | upload


def checkpoint_choices() -> list[Choice]:
    """Every checkpoint the app may open: the embedded demos, the runs under the runs root,
    and the uploads (nothing else: paths never come from free text)."""
    from das_core.demo import available_demos
    from das_core.runs import list_runs
    from das_core.uploads import list_uploads

    out = [Choice(f"demo · {p.stem}", str(p), "demo") for p in available_demos()]
    for run in list_runs(runs_root()):
        if run.checkpoint is not None:
            out.append(Choice(f"run · {run.name}", str(run.checkpoint), "run"))
    out += [Choice(f"upload · {p.name.split('-', 1)[-1]}", str(p), "upload") for p in list_uploads(upload_dir())]
    return out


def _stamp(path: str) -> tuple[int, int]:
    st_ = Path(path).stat()
    return st_.st_size, st_.st_mtime_ns


@st.cache_resource(max_entries=8, show_spinner=False)
def _load_checkpoint(path: str, stamp: tuple[int, int]) -> Checkpoint:
    from das_core.checkpoint import load_checkpoint

    return load_checkpoint(path)


def load_checkpoint(path: str) -> Checkpoint:
    """The checkpoint at ``path`` (cached while the file is unchanged)."""
    return _load_checkpoint(path, _stamp(path))


@st.cache_resource(max_entries=4, show_spinner=False)
def _model(path: str, stamp: tuple[int, int], device: str) -> Any:
    return _load_checkpoint(path, stamp).build_model(device)


def model(ckpt: Checkpoint) -> Any:
    return _model(str(ckpt.path), _stamp(str(ckpt.path)), device_name())


@st.cache_resource(max_entries=4, show_spinner="Loading the dataset…")
def _splits(dataset: str, data_root: str | None, train_classes: int | None, val_classes: int,
            val_fraction: float, seed: int, image_size: int | None = None) -> DatasetSplits:
    from das_core.data import load_splits

    return load_splits(dataset, data_root, train_classes=train_classes, val_classes=val_classes,
                       val_fraction=val_fraction, seed=seed, image_size=image_size)


def splits(ckpt: Checkpoint) -> DatasetSplits:
    """The dataset splits the checkpoint was trained on (for emoji-styles, only when it is
    rendered already: a message saying how to get it, rather than minutes of rendering; an
    uploaded checkpoint only within the allowed data roots: ``DataPolicyError`` otherwise)."""
    from das_core.datapolicy import check_data_access
    from das_core.uploads import within

    c = ckpt.config
    check_data_access(c, uploaded=within(upload_dir(), ckpt.path))
    if c.dataset == "emoji-styles":
        from das_core.data.emoji_styles import require_rendered

        require_rendered(c.image_size, c.data_root)
    return _splits(c.dataset, c.data_root, c.train_classes, c.val_classes, c.val_fraction, c.seed, c.image_size)


def checkpoint_key(ckpt: Checkpoint) -> str:
    from das_core.cache import file_key

    return file_key(ckpt.path)


@st.cache_data(max_entries=16, show_spinner=False)
def _embedding_set(key: str, split: str) -> EmbeddingSet | None:
    from das_core.cache import load_cached_embeddings

    return load_cached_embeddings(key, split)


def embedding_set(ckpt: Checkpoint, split: str) -> EmbeddingSet:
    """Embeddings of ``split``: from memory, else from disk, else computed with a progress bar."""
    key = checkpoint_key(ckpt)
    es = _embedding_set(key, split)
    if es is not None:
        return es
    from das_core.cache import get_embeddings

    ds = splits(ckpt)
    total = len(ds.get(split))
    bar = st.progress(0.0, text=f"Embedding the {split} split ({total:,} images)…")

    def progress(done: int, total_: int) -> None:
        bar.progress(min(1.0, done / max(1, total_)), text=f"Embedding the {split} split: {done:,} / {total_:,}")

    es = get_embeddings(ckpt, split, splits=ds, device=device_name(), progress=progress)
    bar.empty()
    _embedding_set.clear()
    return es


@st.cache_data(max_entries=16, show_spinner=False)
def _map(key: str, split: str, seed: int, _es: EmbeddingSet) -> MapResult:
    from das_core.projection import get_map

    return get_map(_es, seed=seed)


def umap_map(ckpt: Checkpoint, es: EmbeddingSet, seed: int = 0) -> MapResult:
    """The UMAP map of an embedding set (fitted once, then from disk and memory)."""
    with st.spinner(f"Fitting the UMAP map of {len(es):,} points (once; then cached on disk)…"):
        return _map(checkpoint_key(ckpt), es.split, seed, es)


@st.cache_resource(max_entries=4, show_spinner="Building the retrieval index…")
def _index(key: str, split: str, _es: EmbeddingSet) -> Any:
    from das_core.cache import entry_dir
    from das_core.index import RetrievalIndex

    return RetrievalIndex.load_or_build(entry_dir(key, split) / "index", _es.embeddings)


def retrieval_index(ckpt: Checkpoint, es: EmbeddingSet) -> Any:
    return _index(checkpoint_key(ckpt), es.split, es)


@st.cache_data(max_entries=16, show_spinner="Preparing thumbnails…")
def _sprites(key: str, split: str, _ckpt: Checkpoint) -> dict[str, Any]:
    from das_core.thumbs import build_sprites, sprite_metadata

    out = STATIC_CACHE / key / split
    info = build_sprites(splits(_ckpt).get(split), out)
    return {**sprite_metadata(info), "base": f"{STATIC_URL}/{key}/{split}/"}


def sprites(ckpt: Checkpoint, split: str) -> dict[str, Any]:
    """Sprite sheets of the split's thumbnails, served by Streamlit's static file server."""
    return _sprites(checkpoint_key(ckpt), split, ckpt)


# -- DAS on the map -------------------------------------------------------------------------------


@st.cache_resource(max_entries=4, show_spinner=False)
def _trained_das(path: str, stamp: tuple[int, int]) -> Any:
    return _load_checkpoint(path, stamp).build_das()


@st.cache_resource(max_entries=8, show_spinner="Running DAS's updates over the split…")
def _computed_das(key: str, split: str, _ckpt: Checkpoint, _es: EmbeddingSet) -> Any:
    from das_core.analysis import compute_das_state, das_kwargs_for

    cfg = _ckpt.config
    return compute_das_state(
        _es.embeddings, _es.labels, _es.num_classes, das_kwargs=das_kwargs_for(cfg),
        batch_size=cfg.batch_size, samples_per_class=cfg.samples_per_class, seed=cfg.seed,
    )


def trained_das(ckpt: Checkpoint) -> Any:
    """The DAS module the checkpoint was trained with (``None`` without DAS)."""
    return _trained_das(str(ckpt.path), _stamp(str(ckpt.path)))


def das_for_split(ckpt: Checkpoint, es: EmbeddingSet) -> tuple[Any, str]:
    """The DAS module to produce from on this split, and a sentence saying where its state
    (frequency recorder, banks) comes from."""
    if es.num_classes < 2:
        return None, "DAS needs at least two classes in the split."
    if es.split == "train" and ckpt.has_das:
        return (trained_das(ckpt),
                "DAS state: the checkpoint's own frequency recorder and banks, as training left them.")
    das = _computed_das(checkpoint_key(ckpt), es.split, ckpt, es)
    if es.split == "train":
        why = "This checkpoint was trained without DAS"
    else:
        why = f"The {es.split} classes were never trained on, so they have no trained DAS state"
    return das, (f"{why}: the state shown was computed by feeding this split's embeddings to DAS in "
                 f"{ckpt.config.samples_per_class}-per-class batches, as training would.")


def produce(das: Any, es: EmbeddingSet, anchors: np.ndarray, *, r_s: float, r_b: float, rounds: int, topk: int,
            use_dfs: bool, use_mts: bool, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(produced (T·A, d), labels, anchor ids, round 1..T)``; the DAS state is not changed."""
    from das_core.analysis import produce_for_anchors

    return produce_for_anchors(das, es.embeddings, es.labels, anchors, r_s=r_s, r_b=r_b, rounds=rounds, topk=topk,
                               use_dfs=use_dfs, use_mts=use_mts, seed=seed)


@st.cache_resource(max_entries=8, show_spinner=False)
def _placer(key: str, split: str, seed: int, _mp: MapResult, _es: EmbeddingSet) -> Any:
    from das_core.projection import map_placer

    return map_placer(_mp, _es.embeddings)


def placer(ckpt: Checkpoint, es: EmbeddingSet, mp: MapResult) -> Any:
    """Places new embeddings into ``mp`` (its reference index built once per map)."""
    return _placer(checkpoint_key(ckpt), es.split, mp.seed, mp, es)


@st.cache_resource(max_entries=16, show_spinner=False)
def _gap_reference(key: str, split: str, anchors_key: bytes, _es: EmbeddingSet, _anchors: np.ndarray) -> Any:
    from das_core.analysis import gap_reference

    return gap_reference(_es.embeddings, _es.labels, anchors=_anchors)


def gap_reference(ckpt: Checkpoint, es: EmbeddingSet, anchors: np.ndarray) -> Any:
    """The part of the gap-fill measure that does not depend on the produced points."""
    import hashlib

    digest = hashlib.sha1(np.ascontiguousarray(anchors).tobytes()).digest()
    return _gap_reference(checkpoint_key(ckpt), es.split, digest, es, anchors)


def display_image(dataset: Any, index: int, size: int = 112) -> Any:
    from das_core.images import thumbnail

    return thumbnail(dataset.load_image(index), size)
