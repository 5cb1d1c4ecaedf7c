"""Datasets: one registry from name to loader, each returning class-disjoint splits."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from das_core.data.base import (
    ArrayDataset,
    DatasetError,
    DatasetSplits,
    DMLDataset,
    FileDataset,
    carve_validation,
    default_data_dir,
    split_by_classes,
)
from das_core.data.sampler import MPerClassBatchSampler
from das_core.data.spec import SplitSpec

# name -> (module, function). Loaders take (data_root, **options) and return train/test splits;
# the validation split is carved here, the same way for every dataset.
_LOADERS: dict[str, tuple[str, str]] = {
    "fashion-mnist": ("das_core.data.fashion_mnist", "load_fashion_mnist_or_digits"),
    "digits": ("das_core.data.fashion_mnist", "load_digits_splits"),
    "cub200": ("das_core.data.cub", "load_cub200"),
    "cars196": ("das_core.data.cars", "load_cars196"),
    "sop": ("das_core.data.sop", "load_sop"),
    "folder": ("das_core.data.folder", "load_image_folder"),
    "emoji-styles": ("das_core.data.emoji_styles", "load_emoji_styles"),
}
DATASET_NAMES = tuple(_LOADERS)


def get_loader(name: str) -> Callable[..., DatasetSplits]:
    if name not in _LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; valid datasets are: {', '.join(_LOADERS)}")
    module, func = _LOADERS[name]
    loader: Callable[..., DatasetSplits] = getattr(importlib.import_module(module), func)
    return loader


def load_splits(
    name: str,
    data_root: str | Path | None = None,
    *,
    train_classes: int | None = None,
    val_classes: int = 0,
    val_fraction: float = 0.0,
    seed: int = 0,
    image_size: int | None = None,
) -> DatasetSplits:
    """Load dataset ``name`` and carve the validation split off its training classes.
    ``image_size``: the model's input size; emoji-styles is rendered at it when above 64 px."""
    loader = get_loader(name)
    kwargs: dict[str, Any] = {}
    if name == "folder":
        kwargs["train_classes"] = train_classes
    if name == "emoji-styles" and image_size is not None and image_size > 64:
        kwargs["size"] = image_size
    if name == "digits":
        splits = loader()
    else:
        splits = loader(data_root, **kwargs)
    train, val = carve_validation(splits.train, val_classes=val_classes, val_fraction=val_fraction, seed=seed)
    splits.train, splits.val = train, val
    return splits


__all__ = [
    "DATASET_NAMES",
    "ArrayDataset",
    "DMLDataset",
    "DatasetError",
    "DatasetSplits",
    "FileDataset",
    "MPerClassBatchSampler",
    "SplitSpec",
    "carve_validation",
    "default_data_dir",
    "get_loader",
    "load_splits",
    "split_by_classes",
]
