"""M-per-class batch sampling: every batch is ``classes x samples_per_class`` images.

Written here rather than taken from pytorch-metric-learning's ``MPerClassSampler`` because
that one draws from the global RNG and cannot be re-seeded per epoch, which exact
``--resume`` (same batches after a restart) needs; it also yields a flat index stream
rather than batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from das_core.data.base import DatasetError


def _fitting_samples_per_class(batch_size: int, n_classes: int) -> int | None:
    """The smallest samples-per-class that divides ``batch_size`` into 2..``n_classes`` classes."""
    for m in range(-(-batch_size // n_classes), batch_size // 2 + 1):
        if batch_size % m == 0:
            return m
    return None


class MPerClassBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields ``num_batches`` batches of ``batch_size`` indices: ``batch_size // m`` distinct
    classes drawn at random, ``m`` images of each (without replacement when the class has
    at least ``m`` images, with replacement otherwise).

    With ``replacement=True`` (the authors' ``datasampler/class_random_sampler.py``) each of
    the ``batch_size // m`` draws picks a class uniformly *with* replacement and ``m`` of its
    images with replacement, so a class can come twice (``2m`` images, more pairs) and an
    image can repeat; a batch then holds fewer distinct classes (about 43 of 56 draws on CUB).

    The batches of epoch ``e`` depend only on ``(seed, e)``: call ``set_epoch(e)``.
    """

    def __init__(
        self,
        labels: np.ndarray,
        batch_size: int,
        samples_per_class: int,
        *,
        num_batches: int | None = None,
        seed: int = 0,
        rank: int = 0,
        replacement: bool = False,
    ) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if samples_per_class < 1:
            raise DatasetError(f"samples_per_class must be >= 1, got {samples_per_class}")
        if batch_size % samples_per_class:
            raise DatasetError(
                f"batch_size={batch_size} is not a multiple of samples_per_class={samples_per_class}: "
                f"a batch is classes x samples per class (try {max(2 * samples_per_class, batch_size - batch_size % samples_per_class)})"
            )
        self.classes = np.unique(labels)
        n_classes = batch_size // samples_per_class
        if n_classes < 2:
            raise DatasetError(
                f"batch_size={batch_size} with samples_per_class={samples_per_class} gives one class per "
                f"batch, so no pair has a negative; use batch_size >= {2 * samples_per_class}"
            )
        if (n_classes > len(self.classes) and not replacement) or len(self.classes) < 2:
            need = (
                f"a batch of {batch_size} with {samples_per_class} samples per class needs {n_classes} "
                f"classes, but the training split has only {len(self.classes)}"
            )
            if len(self.classes) < 2:
                raise DatasetError(f"{need}; class-disjoint batches need a split with at least 2 classes")
            m = _fitting_samples_per_class(batch_size, len(self.classes))
            raise_m = f"raise --samples-per-class to {m} or " if m is not None else ""
            raise DatasetError(
                f"{need}; {raise_m}lower --batch-size to at most {len(self.classes) * samples_per_class}"
            )
        self.labels = labels
        self.batch_size = batch_size
        self.m = samples_per_class
        self.classes_per_batch = n_classes
        # indices of each class, ascending (a stable sort split at class boundaries: O(N log N),
        # not O(N x classes) -- SOP has 11k training classes)
        order = np.argsort(labels, kind="stable")
        self.members = np.split(order, np.searchsorted(labels[order], self.classes[1:]))
        self.num_batches = num_batches if num_batches is not None else max(1, len(labels) // batch_size)
        self.seed = seed
        self.rank = rank
        self.replacement = replacement
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        # Each rank of a distributed run draws its own batches (rank 0 as a single process does).
        key = [self.seed, self.epoch] if self.rank == 0 else [self.seed, self.epoch, self.rank]
        rng = np.random.default_rng(key)
        for _ in range(self.num_batches):
            chosen = rng.choice(len(self.classes), size=self.classes_per_batch, replace=self.replacement)
            batch: list[int] = []
            for c in chosen:
                pool = self.members[c]
                pick = rng.choice(pool, size=self.m, replace=self.replacement or len(pool) < self.m)
                batch.extend(int(i) for i in pick)
            yield batch
