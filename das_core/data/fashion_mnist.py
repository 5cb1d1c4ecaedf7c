"""Fashion-MNIST from its idx files, and scikit-learn's bundled digits.

Both use the zero-shot protocol of this project: classes 0-4 train, 5-9 test (all 70,000
Fashion-MNIST images, the original train and test files merged, then split by class).
"""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import numpy as np

from das_core.data.base import ArrayDataset, DatasetError, DatasetSplits, default_data_dir, split_by_classes

log = logging.getLogger(__name__)

FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
TRAIN_CLASSES = (0, 1, 2, 3, 4)
TEST_CLASSES = (5, 6, 7, 8, 9)


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): magic, dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read {path}: {exc} (is the file complete?)") from exc
    if len(data) < 4:
        raise DatasetError(f"{path} is not an idx file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise DatasetError(f"{path} is not a uint8 idx file (magic {data[:4].hex()})")
    if len(data) < 4 + 4 * ndim:
        raise DatasetError(f"{path} is truncated: its header ends after {len(data)} bytes")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    expected = int(np.prod(dims))
    if body.size != expected:
        raise DatasetError(f"{path} is truncated: {body.size} bytes of data, expected {expected} for shape {dims}")
    return body.reshape(dims).copy()


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        p = folder / name
        if p.is_file():
            return p
    return None


def candidate_dirs(data_root: str | Path | None) -> list[Path]:
    """Where Fashion-MNIST is looked for, in order."""
    dirs: list[Path] = []
    if data_root is not None:
        root = Path(data_root).expanduser()
        dirs += [root, root / "fashion-mnist", root / "FashionMNIST" / "raw"]
        return dirs
    base = default_data_dir()
    return [DEBIAN_DIR, base / "fashion-mnist", base / "FashionMNIST" / "raw"]


def locate_fashion_mnist(data_root: str | Path | None = None) -> Path | None:
    for d in candidate_dirs(data_root):
        if all(_find_idx(d, stem) is not None for stem in IDX_FILES.values()):
            return d
    return None


def download_fashion_mnist(target: Path | None = None) -> Path:
    """Fetch the idx files with torchvision's downloader (needs internet)."""
    from torchvision.datasets import FashionMNIST

    root = target or default_data_dir()
    try:
        FashionMNIST(root=str(root), train=True, download=True)
        FashionMNIST(root=str(root), train=False, download=True)
    except Exception as exc:  # torchvision raises RuntimeError/URLError/OSError depending on the failure
        raise DatasetError(
            f"could not download Fashion-MNIST into {root}: {exc}. Install Debian's package "
            f"`dataset-fashion-mnist` (files in {DEBIAN_DIR}) or pass --data-root to a folder holding "
            f"{', '.join(IDX_FILES.values())} (.gz allowed)"
        ) from exc
    return root / "FashionMNIST" / "raw"


def load_fashion_mnist_arrays(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    parts = {}
    for key, stem in IDX_FILES.items():
        p = _find_idx(folder, stem)
        if p is None:
            raise DatasetError(f"Fashion-MNIST: {folder} lacks {stem} (or {stem}.gz)")
        parts[key] = read_idx(p)
    for split in ("train", "test"):
        imgs, labs = parts[f"{split}_images"], parts[f"{split}_labels"]
        if imgs.ndim != 3 or imgs.shape[1:] != (28, 28) or labs.ndim != 1 or len(imgs) != len(labs):
            raise DatasetError(
                f"Fashion-MNIST in {folder}: expected 28x28 {split} images matching the labels, "
                f"got images {imgs.shape} and labels {labs.shape}"
            )
    images = np.concatenate([parts["train_images"], parts["test_images"]])
    labels = np.concatenate([parts["train_labels"], parts["test_labels"]]).astype(np.int64)
    if len(labels) == 0:
        raise DatasetError(f"Fashion-MNIST in {folder}: the idx files hold no images")
    if labels.max() > 9:
        raise DatasetError(f"Fashion-MNIST in {folder}: labels must be 0-9, found {labels.max()}")
    return images, labels


def load_fashion_mnist(data_root: str | Path | None = None, *, allow_download: bool = True) -> DatasetSplits:
    """Fashion-MNIST splits; raises ``DatasetError`` when it cannot be found or fetched."""
    folder = locate_fashion_mnist(data_root)
    if folder is None and data_root is not None:
        looked = ", ".join(str(d) for d in candidate_dirs(data_root))
        raise DatasetError(
            f"Fashion-MNIST not found under --data-root {data_root}: looked for "
            f"{', '.join(IDX_FILES.values())} (or .gz) in {looked}"
        )
    if folder is None:
        if not allow_download:
            raise DatasetError("Fashion-MNIST not found and downloading is off")
        folder = download_fashion_mnist()
    images, labels = load_fashion_mnist_arrays(folder)
    full = ArrayDataset("fashion-mnist", "all", images, labels, FASHION_CLASSES, source=str(folder))
    train, test = split_by_classes(full, TRAIN_CLASSES, TEST_CLASSES)
    return DatasetSplits("fashion-mnist", train, test, source=str(folder))


def load_digits_splits() -> DatasetSplits:
    """scikit-learn's bundled 8x8 digits (1,797 images, always offline): 0-4 train, 5-9 test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    names = [str(i) for i in range(10)]
    full = ArrayDataset("digits", "all", images, labels, names, source="sklearn.datasets.load_digits")
    train, test = split_by_classes(full, TRAIN_CLASSES, TEST_CLASSES)
    return DatasetSplits("digits", train, test, source="sklearn.datasets.load_digits")


def load_fashion_mnist_or_digits(data_root: str | Path | None = None) -> DatasetSplits:
    """Fashion-MNIST if it can be found or fetched; otherwise say so and use digits."""
    try:
        return load_fashion_mnist(data_root)
    except DatasetError as exc:
        if data_root is not None:
            raise  # the user named a folder: tell them what is wrong with it
        msg = f"Fashion-MNIST is unavailable ({exc}); falling back to scikit-learn's digits"
        log.warning(msg)
        splits = load_digits_splits()
        splits.notes.append(msg)
        return splits
