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

from das_core.store.runs import REPO_ROOT, default_runs_root

if TYPE_CHECKING:
    from das_core.data import DatasetSplits, SplitSpec
    from das_core.explorer.umap_fit import MapResult
    from das_core.store.cache import EmbeddingSet
    from das_core.store.checkpoint import Checkpoint

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
    from das_core.runtime import resolve_device

    return resolve_device("auto").type


@dataclass(frozen=True)
class Choice:
    label: str
    path: str
    kind: str  # demo | run | sweep | upload | embeddings


OPENED_FILES = "byo_opened_files"  # session state: the embeddings files opened by path


def checkpoint_choices(external: bool = False) -> list[Choice]:
    """Every checkpoint the app may open: the embedded demos, the runs under the runs root,
    and the uploads (nothing else: paths never come from free text). With ``external``, also
    the embeddings files uploaded or opened by path (``open_embeddings_path``)."""
    from das_core.store.demo import available_demos
    from das_core.store.runs import list_runs
    from das_core.store.uploads import list_uploads

    out = [Choice(f"demo · {p.stem}", str(p), "demo") for p in available_demos()]
    for run in list_runs(runs_root()):
        if run.checkpoint is not None:
            out.append(Choice(f"run · {run.name}", str(run.checkpoint), "run"))
    from das_core.store.sweeps import trial_checkpoints

    out += [Choice(label, str(path), "sweep") for label, path in trial_checkpoints(runs_root())]
    out += [Choice(f"upload · {p.name.split('-', 1)[-1]}", str(p), "upload") for p in list_uploads(upload_dir())]
    if external:
        from das_core.store.uploads import list_embeddings_uploads

        files = [*st.session_state.get(OPENED_FILES, []), *map(str, list_embeddings_uploads(upload_dir()))]
        out += [Choice(f"embeddings · {Path(p).name.split('-', 1)[-1] if Path(p).parent == upload_dir() else Path(p).name}",
                       p, "embeddings") for p in dict.fromkeys(files) if Path(p).is_file()]
    return out


def embeddings_roots() -> list[Path]:
    """The folders the app may read an embeddings file (by path) or its images from: the
    allowed data roots (``das_core.data.policy``) and the runs root."""
    from das_core.data.policy import allowed_data_roots

    return [*allowed_data_roots(), runs_root()]


def open_embeddings_path(text: str) -> str:
    """Check and remember an embeddings file typed as a path (only inside ``embeddings_roots``);
    returns its resolved path. Raises ``EmbeddingsFileError`` with the reason otherwise."""
    from das_core.store.external import SUFFIXES, EmbeddingsFileError, is_embeddings_file
    from das_core.store.uploads import within

    p = Path(text.strip()).expanduser()
    roots = embeddings_roots()
    if not any(within(r, p) for r in roots):
        raise EmbeddingsFileError(
            f"{p}: outside the folders this app may read ({', '.join(map(str, roots))}); move the file there, "
            "upload it, or add its folder to $DAS_DATA_ROOTS"
        )
    if not is_embeddings_file(p):
        raise EmbeddingsFileError(f"{p.name}: an embeddings file ends in {' or '.join(SUFFIXES)}")
    load_source(str(p.resolve()))  # validates: a bad file is refused here, with its message
    opened = st.session_state.setdefault(OPENED_FILES, [])
    if str(p.resolve()) not in opened:
        opened.append(str(p.resolve()))
    return str(p.resolve())


def is_external(source: Any) -> bool:
    """Whether a picked source is an embeddings file (not a checkpoint)."""
    return bool(getattr(source, "external", False))


@st.cache_resource(max_entries=8, show_spinner="Reading the embeddings file…")
def _embeddings_file(path: str, stamp: tuple[int, int]) -> Any:
    from das_core.store.external import read_embeddings_file

    return read_embeddings_file(path)


def load_source(path: str) -> Any:
    """A checkpoint, or an embeddings file (``EmbeddingsFile``) by its suffix."""
    from das_core.store.external import is_embeddings_file

    if is_embeddings_file(path):
        return _embeddings_file(path, _stamp(path))
    return load_checkpoint(path)


def _stamp(path: str) -> tuple[int, int]:
    st_ = Path(path).stat()
    return st_.st_size, st_.st_mtime_ns


def _identity(path: str) -> str:
    from das_core.store.checkpoint import checkpoint_identity

    return checkpoint_identity(path)


@st.cache_resource(max_entries=8, show_spinner=False)
def _load_checkpoint(path: str, identity: str) -> Checkpoint:
    from das_core.store.checkpoint import load_checkpoint

    return load_checkpoint(path)


def load_checkpoint(path: str) -> Checkpoint:
    """The checkpoint at ``path`` (cached while the file is unchanged: same identity)."""
    return _load_checkpoint(path, _identity(path))


@st.cache_resource(max_entries=4, show_spinner=False)
def _model(identity: str, device: str, _ckpt: Checkpoint) -> Any:
    return _ckpt.build_model(device)


def model(ckpt: Checkpoint) -> Any:
    """The checkpoint's model; for an embeddings file, the model of the checkpoint it names."""
    if is_external(ckpt):
        from das_core.store.external import EmbeddingsFileError
        from das_core.store.uploads import within

        named = Path(str(getattr(ckpt, "checkpoint", None) or ""))
        named = named if named.is_absolute() else Path(ckpt.path).parent / named
        known = {str(Path(c.path).resolve()) for c in checkpoint_choices()}
        if str(named.resolve()) not in known and not any(within(r, named) for r in embeddings_roots()):
            raise EmbeddingsFileError(f"the file names the checkpoint {named}, which is neither one of the app's "
                                      "checkpoints nor inside the folders it may read")
        return model(load_checkpoint(str(named)))
    return _model(ckpt.identity, device_name(), ckpt)


@st.cache_resource(max_entries=4, show_spinner="Loading the dataset…")
def _splits(spec: SplitSpec) -> DatasetSplits:
    return spec.load()


def splits(ckpt: Checkpoint) -> DatasetSplits:
    """The dataset splits the checkpoint was trained on (for emoji-styles, only when it is
    rendered already: a message saying how to get it, rather than minutes of rendering; an
    uploaded checkpoint only within the allowed data roots: ``DataPolicyError`` otherwise)."""
    from das_core.data.policy import check_data_access
    from das_core.store.uploads import within

    if is_external(ckpt):
        return _file_splits(str(ckpt.path), _stamp(str(ckpt.path)))  # type: ignore[no-any-return]
    c = ckpt.config
    check_data_access(c, uploaded=within(upload_dir(), ckpt.path))
    if c.dataset == "emoji-styles":
        from das_core.data.emoji_styles import require_rendered

        require_rendered(c.image_size, c.data_root)
    return _splits(c.split_spec())


@st.cache_resource(max_entries=8, show_spinner=False)
def _file_splits(path: str, stamp: tuple[int, int]) -> Any:
    from das_core.store.external import file_splits

    # images are read only inside the folders the app may read (as for an uploaded checkpoint)
    return file_splits(_embeddings_file(path, stamp), embeddings_roots())


@st.cache_data(max_entries=16, show_spinner=False)
def _embedding_set(key: str, split: str) -> EmbeddingSet | None:
    from das_core.store.cache import load_cached_embeddings

    return load_cached_embeddings(key, split)


def embedding_set(ckpt: Checkpoint, split: str) -> EmbeddingSet:
    """Embeddings of ``split``: from memory, else from disk, else computed with a progress bar."""
    if is_external(ckpt):
        return ckpt.embedding_set()  # type: ignore[attr-defined, no-any-return]
    es = _embedding_set(ckpt.identity, split)
    if es is not None:
        return es
    from das_core.store.cache import get_embeddings

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
    from das_core.explorer.maps import get_map

    return get_map(_es, seed=seed)


def umap_map(ckpt: Checkpoint, es: EmbeddingSet, seed: int = 0) -> MapResult:
    """The UMAP map of an embedding set (fitted once, then from disk and memory)."""
    with st.spinner(f"Fitting the UMAP map of {len(es):,} points (once; then cached on disk)…"):
        return _map(ckpt.identity, es.split, seed, es)


@st.cache_resource(max_entries=4, show_spinner="Building the retrieval index…")
def _index(key: str, split: str, _es: EmbeddingSet) -> Any:
    from das_core.retrieval.index import cached_index

    return cached_index(_es)


def retrieval_index(ckpt: Checkpoint, es: EmbeddingSet) -> Any:
    return _index(ckpt.identity, es.split, es)


@st.cache_data(max_entries=16, show_spinner="Preparing thumbnails…")
def _sprites(key: str, split: str, _ckpt: Checkpoint) -> dict[str, Any]:
    from das_core.explorer.thumbs import cached_sprites, sprite_metadata

    info, folder = cached_sprites(key, split, splits(_ckpt).get(split), root=STATIC_CACHE)
    return {**sprite_metadata(info), "base": f"{STATIC_URL}/{folder.as_posix()}/"}


def sprites(ckpt: Checkpoint, split: str) -> dict[str, Any]:
    """Sprite sheets of the split's thumbnails, served by Streamlit's static file server."""
    if is_external(ckpt) and not splits(ckpt).has_images:
        raise ValueError("the embeddings file names no image files this app may read (a 'paths' array or column)")
    return _sprites(ckpt.identity, split, ckpt)


# -- DAS on the map -------------------------------------------------------------------------------


@st.cache_resource(max_entries=4, show_spinner=False)
def _trained_das(identity: str, _ckpt: Checkpoint) -> Any:
    return _ckpt.build_das()


@st.cache_resource(max_entries=8, show_spinner="Running DAS's updates over the split…")
def _das_state(key: str, split: str, _ckpt: Checkpoint, _es: EmbeddingSet) -> tuple[Any, str]:
    from das_core.explorer.analysis import das_state_for

    return das_state_for(_ckpt, _es)


def trained_das(ckpt: Checkpoint) -> Any:
    """The DAS module the checkpoint was trained with (``None`` without DAS)."""
    return _trained_das(ckpt.identity, ckpt)


def das_for_split(ckpt: Checkpoint, es: EmbeddingSet) -> tuple[Any, str]:
    """The DAS module to produce from on this split, and a sentence saying where its state
    (frequency recorder, banks) comes from (``analysis.das_state_for``, cached)."""
    return _das_state(ckpt.identity, es.split, ckpt, es)


@st.cache_resource(max_entries=8, show_spinner=False)
def _placer(key: str, split: str, seed: int, _mp: MapResult, _es: EmbeddingSet) -> Any:
    from das_core.explorer.umap_fit import map_placer

    return map_placer(_mp, _es.embeddings)


def placer(ckpt: Checkpoint, es: EmbeddingSet, mp: MapResult) -> Any:
    """Places new embeddings into ``mp`` (its reference index built once per map)."""
    return _placer(ckpt.identity, es.split, mp.seed, mp, es)


@st.cache_resource(max_entries=16, show_spinner=False)
def _gap_reference(key: str, split: str, anchors_key: bytes, _es: EmbeddingSet, _anchors: np.ndarray) -> Any:
    from das_core.explorer.analysis import gap_reference

    return gap_reference(_es.embeddings, _es.labels, anchors=_anchors)


def gap_reference(ckpt: Checkpoint, es: EmbeddingSet, anchors: np.ndarray) -> Any:
    """The part of the gap-fill measure that does not depend on the produced points."""
    import hashlib

    digest = hashlib.sha1(np.ascontiguousarray(anchors).tobytes()).digest()
    return _gap_reference(ckpt.identity, es.split, digest, es, anchors)


def explore_figure(ckpt: Checkpoint, es: EmbeddingSet, mp: MapResult, classes: list[int], *, show_links: bool,
                   thumbs: dict[str, Any] | None,
                   produced: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
                   ) -> tuple[Any, list[int]]:
    """The Explore map and the classes it has produced traces for: the real points (all of them
    with many classes, else those of ``classes``) and a trace per class of ``classes`` in the
    split (``plots.embedding_map(produced_slots=...)``), holding the points ``produced``
    (``(coords, labels, anchor ids, rounds)``) as they were when this session first drew this
    figure.

    One figure per session and choice (checkpoint, split, classes, links): it does not change
    when the sliders move, so neither does what Streamlit sends for it (the browser's message
    cache then spares re-sending it, and a 35,000-point figure is not rebuilt on every rerun);
    the produced points of later moves travel on their own (``app.produced_layer``). The first
    draw holds the points already, so the browser draws the map once, not once empty and again
    filled. Do not modify it."""
    import json

    from app import plots

    key = (ckpt.identity, es.split, mp.seed, tuple(int(c) for c in classes), bool(show_links),
           json.dumps(thumbs, sort_keys=True, default=str))
    held = st.session_state.get("_explore_figure")
    if held is not None and held[0] == key:
        return held[1], held[2]
    many = plots.is_many(len(es.class_names))
    keep = np.ones(len(es), dtype=bool) if many else np.isin(es.labels, classes)
    slots = sorted(set(int(c) for c in classes) & set(np.unique(es.labels[keep]).tolist()))
    anchor_xy = None if produced is None else mp.coords[np.asarray(produced[2], dtype=np.int64)]
    fig = plots.embedding_map(
        mp.coords[keep], es.labels[keep], es.class_names, np.flatnonzero(keep), produced=produced,
        anchor_coords=anchor_xy, produced_slots=slots, show_links=show_links, thumbs=thumbs,
        uirevision=f"explore-{ckpt.path}-{es.split}", highlight_classes=list(classes),
    )
    st.session_state["_explore_figure"] = (key, fig, slots)
    return fig, slots


def display_image(dataset: Any, index: int, size: int = 112) -> Any:
    from das_core.data.images import thumbnail

    return thumbnail(dataset.load_image(index), size)
