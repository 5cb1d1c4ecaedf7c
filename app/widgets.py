"""Widgets shared by the pages: the checkpoint picker, the split picker, and the error guard
that turns every failure into a message on the page (never a traceback)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamlit as st

from app import state

if TYPE_CHECKING:
    from das_core.store.checkpoint import Checkpoint

log = logging.getLogger("das_explorer.app")

# Streamlit's control-flow exceptions must pass through the guard untouched.
_STREAMLIT_FLOW = ("StopException", "RerunException")


@contextlib.contextmanager
def guard(what: str) -> Iterator[None]:
    """Run a block; a user error (bad data, checkpoint, image, config) or any other failure
    becomes one clear message on the page and stops the script there."""
    from das_core.errors import USER_ERRORS

    try:
        yield
    except Exception as exc:
        if type(exc).__name__ in _STREAMLIT_FLOW:
            raise
        if isinstance(exc, USER_ERRORS):
            st.error(f"**{what}**: {exc}")
        elif isinstance(exc, FileNotFoundError | PermissionError):
            st.error(f"**{what}**: {exc.strerror or exc}: {exc.filename}. Was it moved or deleted?")
        else:
            from das_core.crashlog import last_resort_message

            log.exception("%s failed", what)
            st.error(f"**{what}**: {last_resort_message(exc, what)}")
        st.stop()


def _upload_box() -> None:
    from das_core.store.checkpoint import CheckpointError
    from das_core.store.uploads import store_checkpoint_upload

    up = st.file_uploader("Upload a .safetensors checkpoint", type=None, key="ckpt_upload",
                          help="Only DAS Explorer checkpoints (.safetensors) are kept; pickles are refused.")
    if up is None or st.session_state.get("ckpt_upload_done") == up.file_id:
        return
    st.session_state["ckpt_upload_done"] = up.file_id
    try:
        path = store_checkpoint_upload(state.upload_dir(), up.name, up.getvalue())
    except CheckpointError as exc:
        st.error(f"Upload refused: {exc}")
        return
    except Exception as exc:  # the last resort: a bug, not the file's fault; the staging file is gone
        from das_core.crashlog import last_resort_message

        st.error(f"Upload refused: {last_resort_message(exc, 'storing an upload')}")
        return
    st.session_state["ckpt_path"] = str(path)
    st.success(f"Uploaded {up.name}")


def _embeddings_box() -> None:
    """Open an embeddings file that das_core did not make: an upload, or a path on the server
    (inside the folders the app may read)."""
    from das_core.store.external import EmbeddingsFileError
    from das_core.store.uploads import store_embeddings_upload

    st.caption(".npz (arrays embeddings, labels; optional class_names, paths, checkpoint) or Parquet "
               "(a vector column and a label column; optional class_name, path).")
    up = st.file_uploader("Upload an embeddings file", type=["npz", "parquet"], key="byo_upload")
    if up is not None and st.session_state.get("byo_upload_done") != up.file_id:
        st.session_state["byo_upload_done"] = up.file_id
        try:
            st.session_state["ckpt_path"] = str(store_embeddings_upload(state.upload_dir(), up.name, up.getvalue()))
            st.success(f"Opened {up.name}")
        except EmbeddingsFileError as exc:
            st.error(f"This file cannot be opened: {exc}")
    path = st.text_input("…or its path on this server", key="byo_path", placeholder="/data/my-embeddings.npz")
    if st.button("Open", key="byo_open", disabled=not path.strip()):
        try:
            st.session_state["ckpt_path"] = state.open_embeddings_path(path)
        except EmbeddingsFileError as exc:
            st.error(f"This file cannot be opened: {exc}")
        except OSError as exc:
            st.error(f"This file cannot be opened: {exc.strerror or exc}")


def checkpoint_picker(key: str = "ckpt_path", label: str = "Checkpoint", *, sidebar: bool = True,
                      upload: bool = True, external: bool = False) -> Checkpoint:
    """Pick a checkpoint (demo, run, upload) and return it loaded; stops the page with a message
    when there is none or it cannot be read (e.g. a run folder deleted under the app's feet).
    With ``external`` an embeddings file (``das_core.store.external.EmbeddingsFile``) can be
    opened and picked too; it stands in for a checkpoint (``state.is_external`` tells)."""
    where = st.sidebar if sidebar else st.container()
    with where:
        if upload:
            with st.expander("Upload a checkpoint"):
                _upload_box()
        if external:
            with st.expander("Open an embeddings file"):
                _embeddings_box()
        choices = state.checkpoint_choices(external=external)
        if not choices:
            st.warning("No checkpoint yet: run `make demo-model`, or train one on the Train page.")
            st.stop()
        paths = [c.path for c in choices]
        current = st.session_state.get(key)
        if current not in paths:
            if current is not None:
                st.warning("The checkpoint chosen before is gone (moved or deleted); back to the first one.")
            st.session_state[key] = paths[0]
        labels = {c.path: c.label for c in choices}
        path = st.selectbox(label, paths, key=key, format_func=lambda p: labels.get(p, p))
    with guard(f"Opening {labels.get(path, path)}"):
        return state.load_source(path) if external else state.load_checkpoint(path)


def split_picker(ckpt: Checkpoint, key: str = "split", *, default: str = "train", sidebar: bool = True) -> str:
    if state.is_external(ckpt):
        from das_core.store.external import SPLIT

        return SPLIT  # an embeddings file holds one set of items
    avail = state.splits(ckpt).available()
    names = {"train": "train (training classes)", "val": "validation", "test": "test (unseen classes)"}
    where = st.sidebar if sidebar else st.container()
    if st.session_state.get(key) not in avail:
        st.session_state[key] = default if default in avail else avail[0]
    return str(where.radio("Split", avail, key=key, format_func=lambda s: names.get(s, s), horizontal=True))


def checkpoint_caption(ckpt: Checkpoint) -> str:
    if state.is_external(ckpt):
        ef: Any = ckpt
        model = f"made by {Path(ef.checkpoint).name}" if ef.checkpoint else "no model named (query by item only)"
        notes = "".join(f" · {n}" for n in ef.notes)
        return (f"embeddings file {ef.name} · {len(ef):,} items · {ef.embeddings.shape[1]}-d · "
                f"{len(ef.class_names):,} classes · {model}{notes}")
    c = ckpt.config
    das = "DAS on" if c.das else "no DAS"
    test = ckpt.metrics.get("test", {}) if isinstance(ckpt.metrics, dict) else {}
    r1 = f", test R@1 {100 * test['R@1']:.1f}%" if "R@1" in test else ""
    return (f"{ckpt.dataset} · {c.backbone} {c.embedding_dim}-d · {c.loss} / {c.miner} · {das} · "
            f"epoch {ckpt.epoch}{r1}")


def largest_classes(labels: Any, n: int) -> list[int]:
    """The ``n`` classes with the most items (ties: lower class id first), in id order."""
    import numpy as np

    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    order = np.lexsort((np.arange(len(counts)), -counts))
    return sorted(int(c) for c in order[:n] if counts[c] > 0)


def class_picker(names: Sequence[str], key: str, *, default: Sequence[int], label: str = "Classes",
                 many_label: str | None = None, where: Any = None, help: str | None = None) -> list[int]:
    """Pick classes by name. Up to ``plots.MAX_LEGEND_CLASSES`` classes: every class is offered
    and ``default`` chosen. More: a searchable multiselect (type part of a name) limited to that
    many picks, starting from ``default``; classes held from a previous checkpoint that this one
    lacks are dropped first."""
    from app.plots import MAX_LEGEND_CLASSES, is_many

    where = where if where is not None else st
    options = list(range(len(names)))
    held = st.session_state.get(key)
    if held is not None:
        kept = [c for c in held if isinstance(c, int) and 0 <= c < len(names)]
        if kept != list(held):
            st.session_state[key] = kept
    else:
        st.session_state[key] = list(default)
    many = is_many(len(names))
    picked = where.multiselect(
        (many_label or f"{label} (type a name to search {len(names):,})") if many else label, options,
        key=key, format_func=lambda c: str(names[c]), max_selections=MAX_LEGEND_CLASSES if many else None,
        help=help,
    )
    return [int(c) for c in picked]
