"""Tiny datasets in the official on-disk layouts, for tests.

Each ``make_*`` writes small random images (a few pixels a side) into ``root`` and returns
the dataset folder, which the matching loader accepts as ``data_root``:

- ``make_cub_layout``    -> ``root/CUB_200_2011``           (``load_cub200``)
- ``make_cars_layout``   -> ``root`` (cars_annos.mat, car_ims/) (``load_cars196``)
- ``make_sop_layout``    -> ``root/Stanford_Online_Products`` (``load_sop``)
- ``make_image_folder``  -> ``root`` (one subfolder per class)  (``load_image_folder``)
- ``make_styled_folder`` -> ``root`` (class/style/image: many classes, with styles) (``load_image_folder``)
- ``make_idx_files``     -> ``root`` (Fashion-MNIST idx files)   (``load_fashion_mnist``)

Import with ``from fixtures import make_cub_layout`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import gzip
import io
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

CUB_BIRDS = (
    "Black_footed_Albatross",
    "Laysan_Albatross",
    "Sooty_Albatross",
    "Groove_billed_Ani",
    "Crested_Auklet",
    "Least_Auklet",
    "Parakeet_Auklet",
    "Rhinoceros_Auklet",
)
CAR_MODELS = (
    "AM General Hummer SUV 2000",
    "Acura RL Sedan 2012",
    "Acura TL Sedan 2012",
    "Acura TL Type-S 2008",
    "Acura TSX Sedan 2012",
    "Acura Integra Type R 2001",
    "Acura ZDX Hatchback 2012",
    "Aston Martin V8 Vantage Convertible 2012",
)
SOP_CATEGORIES = ("bicycle", "cabinet", "chair", "coffee_maker")


def image_bytes(
    fmt: str = "JPEG", size: tuple[int, int] = (12, 10), *, seed: int = 0, mode: str = "RGB"
) -> bytes:
    """A small random image encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_image(path: Path, *, seed: int = 0, size: tuple[int, int] = (12, 10)) -> Path:
    """A small random image at ``path``, encoded after its extension (JPEG unless .png/.gif/...)."""
    ext = path.suffix.lower()
    fmt = {".png": "PNG", ".gif": "GIF", ".bmp": "BMP", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(fmt.get(ext, "JPEG"), size, seed=seed))
    return path


def _name(names: Sequence[str], i: int) -> str:
    return names[i] if i < len(names) else f"Class_{i + 1}"


def make_cub_layout(root: Path, n_classes: int = 6, per_class: int = 3) -> Path:
    """``root/CUB_200_2011/{images.txt, image_class_labels.txt, classes.txt, train_test_split.txt,
    images/NNN.Name/Name_XXXX.jpg}`` with ids numbered like the real files."""
    base = Path(root) / "CUB_200_2011"
    classes, images, labels, split = [], [], [], []
    image_id = 0
    for c in range(1, n_classes + 1):
        name = _name(CUB_BIRDS, c - 1)
        folder = f"{c:03d}.{name}"
        classes.append(f"{c} {folder}")
        for k in range(per_class):
            image_id += 1
            rel = f"{folder}/{name}_{k + 1:04d}_{image_id}.jpg"
            write_image(base / "images" / rel, seed=image_id)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {k % 2}")
    for fname, lines in (
        ("classes.txt", classes),
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
    ):
        (base / fname).write_text("\n".join(lines) + "\n")
    return base


def make_cars_layout(root: Path, n_classes: int = 6, per_class: int = 3) -> Path:
    """``root/{cars_annos.mat, car_ims/000001.jpg ...}``, the .mat written with the structure of
    the official file: a 1xN struct array ``annotations`` (relative_im_path, bbox_x1, bbox_y1,
    bbox_x2, bbox_y2, class, test) and a 1xC cell array ``class_names``."""
    from scipy.io import savemat

    base = Path(root)
    n = n_classes * per_class
    dtype = [
        (f, "O") for f in ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    ]
    ann = np.zeros((1, n), dtype=dtype)

    def u(v: int) -> np.ndarray:
        return np.array([[v]], dtype=np.uint16 if v > 255 else np.uint8)

    # images interleaved across classes, as in the real file (sorted by file name, not by class)
    for i in range(n):
        cls = i % n_classes + 1
        rel = f"car_ims/{i + 1:06d}.jpg"
        write_image(base / rel, seed=100 + i)
        ann[0, i] = (np.array([rel]), u(1), u(2), u(11), u(9), u(cls), u(i % 2))
    names = np.empty((1, n_classes), dtype=object)
    for c in range(n_classes):
        names[0, c] = np.array([_name(CAR_MODELS, c)])
    savemat(str(base / "cars_annos.mat"), {"annotations": ann, "class_names": names})
    return base


def make_sop_layout(root: Path, n_classes: int = 6, per_class: int = 3) -> Path:
    """``root/Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, Ebay_info.txt,
    <category>_final/<id>_<k>.JPG}``: class ids 1..n_classes, the first half (rounded down)
    listed in Ebay_train.txt and the rest in Ebay_test.txt, ids numbered per file as in the
    real data."""
    base = Path(root) / "Stanford_Online_Products"
    header = "image_id class_id super_class_id path"
    n_train = n_classes // 2
    files: dict[str, list[str]] = {"Ebay_train.txt": [header], "Ebay_test.txt": [header]}
    info = ["image_id class_id super_class_id path"]
    global_id = 0
    for c in range(1, n_classes + 1):
        super_id = (c - 1) % len(SOP_CATEGORIES) + 1
        cat = SOP_CATEGORIES[super_id - 1]
        product = 111085122870 + c
        lines = files["Ebay_train.txt" if c <= n_train else "Ebay_test.txt"]
        for k in range(per_class):
            global_id += 1
            rel = f"{cat}_final/{product}_{k}.JPG"
            write_image(base / rel, seed=200 + global_id)
            lines.append(f"{len(lines)} {c} {super_id} {rel}")
            info.append(f"{global_id} {c} {super_id} {rel}")
    for fname, lines in files.items():
        (base / fname).write_text("\n".join(lines) + "\n")
    (base / "Ebay_info.txt").write_text("\n".join(info) + "\n")
    return base


def make_image_folder(
    root: Path,
    class_names: Sequence[str] = ("cat", "dog", "eel", "fox"),
    per_class: int = 3,
    exts: Sequence[str] = (".jpg", ".PNG", ".jpeg"),
) -> Path:
    """``root/<class>/img_<k><ext>`` plus things the loader must ignore: a hidden file, a
    hidden folder, a text file and a stray top-level file."""
    base = Path(root)
    for ci, cname in enumerate(class_names):
        for k in range(per_class):
            write_image(base / cname / f"img_{k}{exts[k % len(exts)]}", seed=300 + 10 * ci + k)
        (base / cname / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (base / cname / "notes.txt").write_text("not an image\n")
    write_image(base / ".hidden_class" / "x.jpg", seed=1)
    (base / "README.txt").write_text("class folders below\n")
    return base


def make_styled_folder(root: Path, class_names: Sequence[str], styles: Sequence[str], *, size: int = 8) -> Path:
    """``root/<class>/<style>/img.png``: one image per class and style (the folder loader reads
    the subfolder as the image's style), many classes cheaply (PNG of ``size`` px a side)."""
    base = Path(root)
    rng = np.random.default_rng(0)
    for cname in class_names:
        for sname in styles:
            (base / cname / sname).mkdir(parents=True, exist_ok=True)
            arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(arr, mode="RGB").save(base / cname / sname / "img.png")
    return base


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8, 1-D or 3-D) in the idx format of MNIST / Fashion-MNIST."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    return (
        struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()
    )


def make_idx_files(
    root: Path, n_train: int = 20, n_test: int = 10, *, gz: bool = True, seed: int = 0
) -> Path:
    """The four Fashion-MNIST idx files (``.gz`` when ``gz``) with 28x28 images and labels
    cycling through 0..9."""
    rng = np.random.default_rng(seed)
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            data = idx_bytes(arr)
            name = f"{prefix}-{kind}"
            if gz:
                (base / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (base / name).write_bytes(data)
    return base
