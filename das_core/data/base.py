"""Dataset splits for deep metric learning: images, contiguous labels and class names."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


class DatasetError(ValueError):
    """A dataset cannot be read: the message says what was expected where, and how to fix it."""


def default_data_dir() -> Path:
    """Where downloaded datasets go: ``$DAS_DATA_DIR``, else ``data/`` at the repository root."""
    env = os.environ.get("DAS_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "data"


Transform = Callable[[Image.Image], Any]


class DMLDataset(torch.utils.data.Dataset[tuple[Any, int]]):
    """One split: items with labels ``0..C-1`` (contiguous within the split) and class names.

    ``load_image(i)`` returns the raw PIL image (for thumbnails and queries);
    ``dataset[i]`` returns ``(transform(image), label)``. ``styles`` optionally names the
    style of every item (the vendor that drew an emoji, the font of a glyph, ...), kept as
    ``item_styles`` through every subset; ``style_of(i)`` is what the app shows next to a
    retrieval result (``None``: the dataset records no styles). A dataset that stores styles
    otherwise overrides ``style_of``.
    """

    def __init__(
        self,
        name: str,
        split: str,
        labels: np.ndarray,
        class_names: Sequence[str],
        transform: Transform | None = None,
        styles: Sequence[str] | np.ndarray | None = None,
    ) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim != 1:
            raise DatasetError(f"{name}/{split}: labels must be 1-D, got shape {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DatasetError(f"{name}/{split}: labels must lie in 0..{len(class_names) - 1}")
        self.name = name
        self.split = split
        self.labels = labels
        self.class_names = list(class_names)
        self.transform = transform
        self.item_styles: np.ndarray | None = None
        if styles is not None:
            arr = np.asarray(styles, dtype=str)
            if arr.shape != labels.shape:
                raise DatasetError(f"{name}/{split}: {arr.shape[0] if arr.ndim else 0} styles for {len(labels)} items")
            self.item_styles = arr

    # -- to implement -------------------------------------------------------------------------
    def load_image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def _take(self, indices: np.ndarray) -> DMLDataset:
        """A copy holding only ``indices`` (labels still to be set by the caller)."""
        raise NotImplementedError

    def describe_item(self, index: int) -> str:
        """A human-readable origin of item ``index`` (a path, or an index into a file)."""
        return f"{self.name}/{self.split}#{index}"

    # -- common ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.load_image(index)
        x: Any = self.transform(img) if self.transform is not None else img
        return x, int(self.labels[index])

    def style_of(self, index: int) -> str | None:
        """The style of item ``index``, or ``None`` when the dataset records no styles."""
        return None if self.item_styles is None else str(self.item_styles[index])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def with_transform(self, transform: Transform | None) -> DMLDataset:
        out = copy.copy(self)
        out.transform = transform
        return out

    def subset(self, indices: np.ndarray | Sequence[int], split: str | None = None, *, relabel: bool) -> DMLDataset:
        """The items ``indices``. With ``relabel`` the classes present are renumbered
        ``0..C'-1`` (in their current order) and ``class_names`` shrinks to them."""
        idx = np.asarray(indices, dtype=np.int64)
        out = self._take(idx)
        labels = self.labels[idx]
        names = self.class_names
        if relabel:
            present = np.unique(labels)
            remap = np.full(self.num_classes, -1, dtype=np.int64)
            remap[present] = np.arange(len(present))
            labels = remap[labels]
            names = [self.class_names[c] for c in present]
        styles = None if self.item_styles is None else self.item_styles[idx]
        DMLDataset.__init__(out, self.name, split or self.split, labels, names, self.transform, styles)
        return out


class ArrayDataset(DMLDataset):
    """Images held in memory as a uint8 array: ``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB."""

    def __init__(
        self,
        name: str,
        split: str,
        images: np.ndarray,
        labels: np.ndarray,
        class_names: Sequence[str],
        transform: Transform | None = None,
        source: str = "",
        styles: Sequence[str] | np.ndarray | None = None,
    ) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
            raise DatasetError(
                f"{name}/{split}: images must be uint8 (N,H,W) or (N,H,W,3) matching {len(labels)} labels, "
                f"got {images.dtype} {images.shape}"
            )
        super().__init__(name, split, labels, class_names, transform, styles)
        self.images = images
        self.source = source

    def load_image(self, index: int) -> Image.Image:
        arr = self.images[index]
        return Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB")

    def _take(self, indices: np.ndarray) -> DMLDataset:
        out = copy.copy(self)
        out.images = self.images[indices]
        return out

    def describe_item(self, index: int) -> str:
        return f"{self.source or self.name}/{self.split}#{index}"


class FileDataset(DMLDataset):
    """Images read from files (through the safe loader of ``das_core.data.images``)."""

    def __init__(
        self,
        name: str,
        split: str,
        paths: Sequence[Path],
        labels: np.ndarray,
        class_names: Sequence[str],
        transform: Transform | None = None,
        styles: Sequence[str] | np.ndarray | None = None,
    ) -> None:
        if len(paths) != len(labels):
            raise DatasetError(f"{name}/{split}: {len(paths)} paths but {len(labels)} labels")
        super().__init__(name, split, labels, class_names, transform, styles)
        # already-Path items are kept as they are: re-parsing 120k paths (SOP) costs ~1 s
        self.paths = [p if isinstance(p, Path) else Path(p) for p in paths]

    def load_image(self, index: int) -> Image.Image:
        from das_core.data.images import open_image

        return open_image(self.paths[index])

    def _take(self, indices: np.ndarray) -> DMLDataset:
        out = copy.copy(self)
        out.paths = [self.paths[i] for i in indices]
        return out

    def describe_item(self, index: int) -> str:
        return str(self.paths[index])


@dataclass
class DatasetSplits:
    """Class-disjoint train / test splits, plus an optional validation split carved from the
    training classes (model selection never looks at test classes)."""

    name: str
    train: DMLDataset
    test: DMLDataset
    val: DMLDataset | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def get(self, split: str) -> DMLDataset:
        if split == "train":
            return self.train
        if split == "test":
            return self.test
        if split in ("val", "validation"):
            if self.val is None:
                raise DatasetError(
                    f"{self.name} has no validation split; train with --val-classes N or --val-fraction F"
                )
            return self.val
        raise DatasetError(f"unknown split {split!r}: use train, val or test")

    def available(self) -> list[str]:
        return ["train", *(["val"] if self.val is not None else []), "test"]


def split_by_classes(
    full: DMLDataset, train_classes: Sequence[int], test_classes: Sequence[int]
) -> tuple[DMLDataset, DMLDataset]:
    """Class-disjoint train and test splits of ``full`` (labels of ``full``'s numbering)."""
    tr, te = set(int(c) for c in train_classes), set(int(c) for c in test_classes)
    if tr & te:
        raise DatasetError(f"{full.name}: train and test classes overlap: {sorted(tr & te)[:10]}")
    train_idx = np.flatnonzero(np.isin(full.labels, sorted(tr)))
    test_idx = np.flatnonzero(np.isin(full.labels, sorted(te)))
    return (
        full.subset(train_idx, "train", relabel=True),
        full.subset(test_idx, "test", relabel=True),
    )


def carve_validation(
    train: DMLDataset, *, val_classes: int = 0, val_fraction: float = 0.0, seed: int = 0
) -> tuple[DMLDataset, DMLDataset | None]:
    """Split a validation set off the *training* classes.

    ``val_classes``: the last N training classes become a class-disjoint validation split
    (the zero-shot protocol). ``val_fraction``: that fraction of every training class's
    images is held out (same classes, unseen images). Neither: no validation split.
    """
    if val_classes < 0:
        raise DatasetError(f"{train.name}: val_classes must be >= 0, got {val_classes}")
    if not 0.0 <= val_fraction < 1.0:  # also refuses NaN
        raise DatasetError(f"{train.name}: val_fraction must lie in [0, 1), got {val_fraction}")
    if val_classes and val_fraction:
        raise DatasetError("choose val_classes or val_fraction, not both")
    if val_classes:
        if val_classes >= train.num_classes - 1:
            raise DatasetError(
                f"{train.name}: val_classes={val_classes} leaves fewer than 2 of the "
                f"{train.num_classes} training classes to train on; use at most {train.num_classes - 2}"
            )
        keep = train.num_classes - val_classes
        tr_idx = np.flatnonzero(train.labels < keep)
        va_idx = np.flatnonzero(train.labels >= keep)
        return train.subset(tr_idx, "train", relabel=True), train.subset(va_idx, "val", relabel=True)
    if val_fraction:
        rng = np.random.default_rng(seed)
        va_parts = []
        for c in range(train.num_classes):
            members = np.flatnonzero(train.labels == c)
            n_val = int(round(len(members) * val_fraction))
            if n_val >= len(members):
                n_val = len(members) - 1
            if n_val > 0:
                va_parts.append(rng.choice(members, size=n_val, replace=False))
        va_idx = np.sort(np.concatenate(va_parts)) if va_parts else np.zeros(0, dtype=np.int64)
        if len(va_idx) == 0:
            raise DatasetError(f"{train.name}: val_fraction={val_fraction} holds out no image; raise it")
        tr_mask = np.ones(len(train), dtype=bool)
        tr_mask[va_idx] = False
        return (
            train.subset(np.flatnonzero(tr_mask), "train", relabel=False),
            train.subset(va_idx, "val", relabel=False),
        )
    return train, None


def uint8_batch(dataset: DMLDataset, indices: np.ndarray | Sequence[int]) -> torch.Tensor:
    """Images ``indices`` of an in-memory ``ArrayDataset`` as a uint8 ``(B, C, H, W)`` tensor
    (no per-image transform: the batched preprocessing path takes it from here)."""
    if not isinstance(dataset, ArrayDataset):
        raise TypeError("uint8_batch needs an ArrayDataset")
    arr = dataset.images[np.asarray(indices, dtype=np.int64)]
    t = torch.from_numpy(arr)
    return t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()
