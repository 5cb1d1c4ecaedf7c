"""The map of a checkpoint's split, as the Explore page shows it: embeddings and UMAP map, each
read from the disk cache or computed and saved (``get_map``, ``explorer_map``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from das_core.explorer.umap_fit import (
    MAP_FORMAT,
    MapParams,
    MapProgress,
    MapResult,
    fit_map,
    library_versions,
)
from das_core.store.cache import CacheMiss, DiskCache

if TYPE_CHECKING:
    from das_core.data.base import DatasetSplits
    from das_core.store.cache import EmbeddingSet
    from das_core.store.checkpoint import Checkpoint

log = logging.getLogger(__name__)


def _read_map(path: Path) -> MapResult:
    if not path.is_file():
        raise CacheMiss("no map file")
    return MapResult.load(path)


def _write_map(path: Path, res: MapResult) -> None:
    res.save(path)


MAPS: DiskCache[MapResult] = DiskCache(
    "map", MAP_FORMAT, read=_read_map, write=_write_map, name="map", suffix=".npz", lock=".map.lock"
)


def map_path(emb_set: EmbeddingSet, *, seed: int, params: dict[str, Any]) -> Path:
    """Where ``get_map`` caches the map of ``emb_set`` made with ``seed`` and ``params``: a
    hash of the parameters, the library versions and the arrays' checksums."""
    return MAPS.path(emb_set.checkpoint_key, emb_set.split, _map_key(emb_set, seed, params))


def _map_key(emb_set: EmbeddingSet, seed: int, params: dict[str, Any]) -> dict[str, Any]:
    from das_core.store.cache import array_checksum

    return {
        "seed": int(seed),
        "params": params,
        "versions": library_versions(),
        "embeddings": array_checksum(emb_set.embeddings),
        "labels": array_checksum(emb_set.labels),
    }


def get_map(
    emb_set: EmbeddingSet,
    *,
    seed: int = 0,
    params: MapParams = MapParams(),
    progress: MapProgress | None = None,
) -> MapResult:
    """The map of a cached embedding set: read from
    ``cache_root()/<checkpoint>/<split>/map-<hash>.npz``, else fitted (``fit_map``, stratified
    by the set's labels) and saved. A corrupt or partial file is refitted. A cache hit does
    not import umap."""

    def fit() -> MapResult:
        res = fit_map(emb_set.embeddings, labels=emb_set.labels, seed=seed, params=params, progress=progress)
        res.meta = {
            "checkpoint_key": emb_set.checkpoint_key,
            "split": emb_set.split,
            "dataset": emb_set.dataset,
        }
        return res

    return MAPS.get(
        emb_set.checkpoint_key,
        emb_set.split,
        fit,
        _map_key(emb_set, seed, params.as_dict()),
        accept=lambda res: len(res) == len(emb_set),
    )


def explorer_map(
    ckpt: Checkpoint,
    split: str,
    *,
    data_root: str | None = None,
    device: str = "cpu",
    splits: DatasetSplits | None = None,
    progress: MapProgress | None = None,
    params: MapParams = MapParams(),
) -> tuple[EmbeddingSet, MapResult]:
    """The embeddings and the map of ``split`` under ``ckpt``, each from the cache or computed
    and cached (``cache.get_embeddings`` then ``get_map``): the Explore page's first step, and
    a way to pre-build the cache (e.g. for the demo) before anyone opens the app.
    ``progress(fraction, message)`` covers both steps."""
    from das_core.store.cache import get_embeddings

    def embed_progress(done: int, total: int) -> None:
        if progress is not None:
            progress(0.6 * done / max(1, total), f"embedding {done:,} / {total:,} images")

    def map_progress(fraction: float, message: str) -> None:
        if progress is not None:
            progress(0.6 + 0.4 * fraction, message)

    es = get_embeddings(
        ckpt, split, data_root=data_root, device=device, progress=embed_progress, splits=splits
    )
    return es, get_map(es, progress=map_progress, params=params)
