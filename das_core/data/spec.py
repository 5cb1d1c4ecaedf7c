"""Which splits of which dataset: the frozen, hashable description a run's config maps to
(``TrainConfig.split_spec``), loaded by ``SplitSpec.load``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from das_core.data.base import DatasetSplits


@dataclass(frozen=True)
class SplitSpec:
    """Everything that decides a run's train / validation / test splits, and nothing else (so
    two configs that differ in, say, the learning rate share one loaded dataset)."""

    dataset: str
    data_root: str | None = None
    train_classes: int | None = None
    val_classes: int = 0
    val_fraction: float = 0.0
    seed: int = 0
    image_size: int | None = None

    def load(self) -> DatasetSplits:
        """The splits (``das_core.data.load_splits`` with these values)."""
        from das_core.data import load_splits

        return load_splits(
            self.dataset,
            self.data_root,
            train_classes=self.train_classes,
            val_classes=self.val_classes,
            val_fraction=self.val_fraction,
            seed=self.seed,
            image_size=self.image_size,
        )
