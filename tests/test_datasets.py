"""Dataset loaders on tiny generated datasets in the official layouts, their error messages,
Fashion-MNIST idx reading and the digits fallback, and dataset downloads (file:// URLs and an
unreachable address, no internet needed)."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from das_core.data import (
    DATASET_NAMES,
    DatasetError,
    DatasetSplits,
    DMLDataset,
    FileDataset,
    get_loader,
    load_splits,
)
from das_core.data import download as dl
from das_core.data import fashion_mnist as fm
from das_core.data.cars import load_cars196
from das_core.data.cub import class_name, load_cub200
from das_core.data.folder import load_image_folder
from das_core.data.sop import category, load_sop
from fixtures import (
    idx_bytes,
    make_cars_layout,
    make_cub_layout,
    make_idx_files,
    make_image_folder,
    make_sop_layout,
    make_styled_folder,
    write_image,
)

# --------------------------------------------------------------------------------------------
# helpers


def check_splits(
    splits: DatasetSplits, n_train: int, n_test: int, n_train_classes: int, n_test_classes: int
) -> None:
    """Sizes, class-disjointness, contiguous labels, names and a loadable image in each split."""
    assert (len(splits.train), len(splits.test)) == (n_train, n_test)
    assert (splits.train.num_classes, splits.test.num_classes) == (n_train_classes, n_test_classes)
    assert not set(splits.train.class_names) & set(splits.test.class_names)
    for ds in (splits.train, splits.test):
        assert sorted(set(ds.labels.tolist())) == list(range(ds.num_classes))
        assert len(set(ds.class_names)) == ds.num_classes
        img = ds.load_image(0)
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (12, 10)
        x, y = ds[len(ds) - 1]
        assert isinstance(x, Image.Image) and y == ds.labels[-1]
    assert not {str(p) for p in paths(splits.train)} & {str(p) for p in paths(splits.test)}


def paths(ds: DMLDataset | None) -> list[Path]:
    assert isinstance(ds, FileDataset)
    return ds.paths


def error_of(fn: Callable[..., object], *args: object, **kwargs: object) -> str:
    with pytest.raises(DatasetError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def rewrite_line(path: Path, lineno: int, text: str | None) -> None:
    """Replace (or with ``None`` delete) 1-based line ``lineno`` of ``path``."""
    lines = path.read_text().splitlines()
    if text is None:
        del lines[lineno - 1]
    else:
        lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# CUB-200-2011


def test_cub_splits_names_and_labels(tmp_path: Path) -> None:
    base = make_cub_layout(tmp_path, n_classes=6, per_class=3)
    for root in (tmp_path, base, str(base)):  # the parent folder or CUB_200_2011 itself
        splits = load_cub200(root)
        check_splits(splits, 9, 9, 3, 3)
    assert splits.name == "cub200" and splits.source == str(base)
    assert splits.train.class_names == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    assert splits.test.class_names == ["Groove_billed_Ani", "Crested_Auklet", "Least_Auklet"]
    assert splits.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    first = paths(splits.train)[0]
    assert first.parent.name == "001.Black_footed_Albatross" and first.is_file()
    assert splits.train.describe_item(0) == str(first)
    assert class_name("001.Black_footed_Albatross") == "Black_footed_Albatross"
    assert class_name("200.Common_Yellowthroat") == "Common_Yellowthroat"


def test_cub_odd_class_count_first_half_trains(tmp_path: Path) -> None:
    make_cub_layout(tmp_path, n_classes=7, per_class=2)
    splits = load_cub200(tmp_path)
    check_splits(splits, 6, 8, 3, 4)


def test_cub_default_root_is_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAS_DATA_DIR", str(tmp_path))
    msg = error_of(load_cub200, None)
    assert f"default data folder {tmp_path / 'cub200'}" in msg and "does not exist" in msg
    assert "--data-root" in msg
    make_cub_layout(tmp_path / "cub200", n_classes=4, per_class=2)
    check_splits(load_cub200(None), 4, 4, 2, 2)


def test_cub_missing_root(tmp_path: Path) -> None:
    msg = error_of(load_cub200, tmp_path / "nope")
    assert "CUB-200-2011" in msg and f"data root {tmp_path / 'nope'} does not exist" in msg
    assert "python -m das_core data download cub200 --root DIR" in msg


def test_cub_empty_folder_names_expected_layout(tmp_path: Path) -> None:
    msg = error_of(load_cub200, tmp_path)
    assert f"{tmp_path / 'CUB_200_2011' / 'images.txt'} not found" in msg
    assert "expected the official layout <root>/CUB_200_2011/{images.txt, image_class_labels.txt" in msg
    assert "extract CUB_200_2011.tgz into DIR" in msg


def test_cub_missing_index_file_inside_dataset_folder(tmp_path: Path) -> None:
    base = make_cub_layout(tmp_path)
    (base / "classes.txt").unlink()
    for root in (tmp_path, base):
        assert f"{base / 'classes.txt'} not found" in error_of(load_cub200, root)


def test_cub_missing_images_counted_and_named(tmp_path: Path) -> None:
    base = make_cub_layout(tmp_path, n_classes=6, per_class=3)
    gone = sorted((base / "images").rglob("*.jpg"))[:2]
    for p in gone:
        p.unlink()
    msg = error_of(load_cub200, tmp_path)
    assert f"2 of 18 images listed in {base / 'images.txt'} are missing" in msg
    assert str(gone[0]) in msg and "incomplete" in msg
    assert len(load_cub200(tmp_path, check_files=False).train) == 9  # the check can be skipped


def test_cub_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    base = make_cub_layout(tmp_path)
    rewrite_line(base / "images.txt", 3, "3")
    msg = error_of(load_cub200, tmp_path)
    assert f"{base / 'images.txt'} line 3: expected 2 fields '<image_id> <path>', got 1: '3'" in msg


def test_cub_non_integer_and_duplicate_ids(tmp_path: Path) -> None:
    base = make_cub_layout(tmp_path)
    rewrite_line(base / "image_class_labels.txt", 4, "4 four")
    msg = error_of(load_cub200, tmp_path)
    assert "image_class_labels.txt line 4: class_id must be an integer, got 'four'" in msg
    rewrite_line(base / "image_class_labels.txt", 4, "4 2")
    rewrite_line(base / "classes.txt", 5, "2 005.Crested_Auklet")
    assert "classes.txt line 5: duplicate class_id 2 (first on line 2)" in error_of(load_cub200, tmp_path)


def test_cub_inconsistent_index_files(tmp_path: Path) -> None:
    base = make_cub_layout(tmp_path)
    rewrite_line(base / "image_class_labels.txt", 2, "2 99")
    msg = error_of(load_cub200, tmp_path)
    assert "image_class_labels.txt line 2: class_id 99 is not listed in" in msg
    rewrite_line(base / "image_class_labels.txt", 2, None)
    msg = error_of(load_cub200, tmp_path)
    assert "1 image id(s)" in msg and "have no class" in msg and "(e.g. 2)" in msg


def test_cub_empty_index_file(tmp_path: Path) -> None:
    base = make_cub_layout(tmp_path)
    (base / "images.txt").write_text("\n\n")
    assert f"{base / 'images.txt'} lists nothing" in error_of(load_cub200, tmp_path)


def test_cub_one_class_is_refused(tmp_path: Path) -> None:
    make_cub_layout(tmp_path, n_classes=1)
    assert "found 1 class(es); need at least 2" in error_of(load_cub200, tmp_path)


# --------------------------------------------------------------------------------------------
# CARS196


def test_cars_splits_match_the_mat_file(tmp_path: Path) -> None:
    from scipy.io import loadmat

    base = make_cars_layout(tmp_path, n_classes=6, per_class=3)
    splits = load_cars196(base)
    check_splits(splits, 9, 9, 3, 3)
    assert splits.train.class_names == [
        "AM General Hummer SUV 2000",
        "Acura RL Sedan 2012",
        "Acura TL Sedan 2012",
    ]
    # every image keeps the class the .mat gives it
    mat = loadmat(str(base / "cars_annos.mat"))
    truth = {
        str(a["relative_im_path"][0]): str(mat["class_names"][0, int(a["class"][0, 0]) - 1][0])
        for a in mat["annotations"][0]
    }
    for ds in (splits.train, splits.test):
        for path, label in zip(paths(ds), ds.labels, strict=True):
            assert truth[f"car_ims/{path.name}"] == ds.class_names[label]


def test_cars_errors(tmp_path: Path) -> None:
    from scipy.io import savemat

    msg = error_of(load_cars196, tmp_path)
    assert f"{tmp_path / 'cars_annos.mat'} not found" in msg
    assert "expected the official layout <root>/{cars_annos.mat, car_ims/000001.jpg, ...}" in msg
    assert "python -m das_core data download cars196" in msg

    base = make_cars_layout(tmp_path, n_classes=4, per_class=2)
    (base / "car_ims" / "000003.jpg").unlink()
    msg = error_of(load_cars196, base)
    assert "1 of 8 images listed in" in msg and "000003.jpg" in msg

    (base / "cars_annos.mat").write_bytes(b"MATLAB 5.0 MAT-file, this is not one")
    msg = error_of(load_cars196, base)
    assert f"cannot read {base / 'cars_annos.mat'} as a MATLAB file" in msg

    savemat(str(base / "cars_annos.mat"), {"class_names": np.array(["a", "b"], dtype=object)})
    msg = error_of(load_cars196, base)
    assert "no struct array 'annotations' with fields relative_im_path and class" in msg
    assert "found: class_names" in msg and "cars_train_annos.mat" in msg


def test_cars_class_out_of_range(tmp_path: Path) -> None:
    from scipy.io import loadmat, savemat

    base = make_cars_layout(tmp_path, n_classes=4, per_class=2)
    mat = loadmat(str(base / "cars_annos.mat"))
    mat["annotations"][0, 5]["class"] = np.array([[9]], dtype=np.uint8)
    savemat(
        str(base / "cars_annos.mat"), {"annotations": mat["annotations"], "class_names": mat["class_names"]}
    )
    msg = error_of(load_cars196, base)
    assert "annotation 6 (car_ims/000006.jpg) has class 9, outside 1..4" in msg


# --------------------------------------------------------------------------------------------
# Stanford Online Products


def test_sop_splits_from_the_two_index_files(tmp_path: Path) -> None:
    base = make_sop_layout(tmp_path, n_classes=8, per_class=2)
    for root in (tmp_path, base):
        splits = load_sop(root)
        check_splits(splits, 8, 8, 4, 4)
    assert splits.train.class_names == ["bicycle #1", "cabinet #2", "chair #3", "coffee maker #4"]
    assert splits.test.class_names[0] == "bicycle #5"
    assert all(p.suffix == ".JPG" for p in paths(splits.test))
    assert category("coffee_maker_final/1_0.JPG") == "coffee maker"


def test_sop_errors(tmp_path: Path) -> None:
    msg = error_of(load_sop, tmp_path)
    assert f"{tmp_path / 'Stanford_Online_Products' / 'Ebay_train.txt'} not found" in msg
    assert "Stanford_Online_Products.zip" in msg and "download sop" in msg

    base = make_sop_layout(tmp_path, n_classes=4, per_class=2)
    train = base / "Ebay_train.txt"
    original = train.read_text()
    rewrite_line(train, 1, None)  # header gone
    msg = error_of(load_sop, tmp_path)
    assert "Ebay_train.txt line 1: expected the header 'image_id class_id super_class_id path'" in msg

    train.write_text(original)
    rewrite_line(train, 3, "2 1 bicycle_final/x.JPG")
    assert "Ebay_train.txt line 3: expected 4 fields" in error_of(load_sop, tmp_path)

    train.write_text(original)
    test = base / "Ebay_test.txt"
    rewrite_line(test, 2, "1 1 1 bicycle_final/111085122871_0.JPG")  # a train class in the test file
    assert "1 class_id(s) appear in both Ebay_train.txt and Ebay_test.txt (e.g. 1)" in error_of(
        load_sop, tmp_path
    )

    make_sop_layout(tmp_path, n_classes=4, per_class=2)
    sorted(base.glob("chair_final/*.JPG"))[0].unlink()  # sorted: not the directory order
    assert "1 of 8 images listed in" in error_of(load_sop, tmp_path)


# --------------------------------------------------------------------------------------------
# image folder


def test_image_folder_classes_extensions_and_hidden_files(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, ("cat", "dog", "eel", "fox", "gnu"), per_class=3)
    write_image(root / "dog" / "nested" / "deep.WEBP", seed=7)  # subfolders of a class count
    write_image(root / "dog" / ".hidden.jpg", seed=8)  # hidden: ignored
    splits = load_image_folder(root)  # default: half rounded down -> 2 train classes
    check_splits(splits, 7, 9, 2, 3)
    assert splits.train.class_names == ["cat", "dog"] and splits.test.class_names == ["eel", "fox", "gnu"]
    suffixes = {p.suffix for p in paths(splits.train)}
    assert suffixes == {".jpg", ".PNG", ".jpeg", ".WEBP"}
    assert all(not p.name.startswith(".") for p in paths(splits.train))
    assert splits.train.load_image(6).size == (12, 10)
    check_splits(load_image_folder(root, train_classes=4), 13, 3, 4, 1)
    check_splits(load_splits("folder", root, train_classes=1), 3, 13, 1, 4)


def test_image_folder_styles_from_subfolders_follow_every_split(tmp_path: Path) -> None:
    root = make_styled_folder(tmp_path / "styled", ["ant", "bee", "cow", "doe"], ["noto", "twemoji", "openmoji"])
    write_image(root / "ant" / "loose.png", seed=1)  # directly in its class folder: no style
    splits = load_splits("folder", root, train_classes=2, val_fraction=0.4, seed=0)
    for ds in (splits.train, splits.get("val"), splits.test):
        for i in range(len(ds)):
            path = ds.describe_item(i)
            style = ds.style_of(i)
            assert style == ("" if path.endswith("loose.png") else Path(path).parent.name), (path, style)
    assert sorted(set(splits.test.item_styles.tolist())) == ["noto", "openmoji", "twemoji"]
    plain = load_image_folder(make_image_folder(tmp_path / "plain", ("a", "b"), per_class=2))
    assert plain.train.item_styles is None and plain.train.style_of(0) is None  # no style subfolders: no styles


def test_image_folder_two_classes_default(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, ("a", "b"), per_class=2)
    check_splits(load_image_folder(root), 2, 2, 1, 1)


def test_image_folder_errors(tmp_path: Path) -> None:
    assert "no folder given; pass --data-root DIR" in error_of(load_image_folder, None)
    assert f"data root {tmp_path / 'x'} does not exist" in error_of(load_image_folder, tmp_path / "x")
    (tmp_path / "file.txt").write_text("x")
    assert "is not a folder" in error_of(load_image_folder, tmp_path / "file.txt")

    one = tmp_path / "one"
    make_image_folder(one, ("only",), per_class=2)
    for i in range(3):
        write_image(one / f"loose_{i}.jpg")
    msg = error_of(load_image_folder, one)
    assert "found 1 class folder(s)" in msg and "need at least 2" in msg
    assert "the 3 images directly in" in msg and "per-class subfolders" in msg
    assert "expected the layout <root>/<class name>/<image>.jpg" in msg

    root = make_image_folder(tmp_path / "ok", ("a", "b", "c", "d"), per_class=2)
    for bad in (0, 4, -1, 7, True):
        msg = error_of(load_image_folder, root, train_classes=bad)
        assert f"train_classes={bad!r} is out of range for the 4 classes" in msg and "use 1..3" in msg

    (root / "empty").mkdir()
    (root / "texts").mkdir()
    (root / "texts" / "a.txt").write_text("no image")
    msg = error_of(load_image_folder, root)
    assert "2 class folder(s)" in msg and "hold no images" in msg and "empty, texts" in msg


# --------------------------------------------------------------------------------------------
# registry and validation carving


def test_registry_loads_every_file_dataset(tmp_path: Path) -> None:
    make_cub_layout(tmp_path / "cub")
    make_cars_layout(tmp_path / "cars")
    make_sop_layout(tmp_path / "sop")
    make_image_folder(tmp_path / "folder")
    for name, root in (("cub200", "cub"), ("cars196", "cars"), ("sop", "sop"), ("folder", "folder")):
        assert name in DATASET_NAMES
        splits = get_loader(name)(tmp_path / root)
        assert splits.name == name and len(splits.train) and len(splits.test)


def test_validation_classes_come_from_training_classes_only(tmp_path: Path) -> None:
    make_cub_layout(tmp_path, n_classes=8, per_class=3)
    plain = load_splits("cub200", tmp_path)
    splits = load_splits("cub200", tmp_path, val_classes=2)
    assert splits.available() == ["train", "val", "test"]
    assert splits.train.class_names == plain.train.class_names[:2]
    assert splits.val is not None and splits.val.class_names == plain.train.class_names[2:]
    assert splits.val.labels.tolist() == [0, 0, 0, 1, 1, 1] and splits.val.split == "val"
    assert paths(splits.test) == paths(plain.test)
    assert splits.test.class_names == plain.test.class_names
    assert not set(paths(splits.val)) & set(paths(plain.test))


def test_validation_fraction_holds_out_images_of_training_classes(tmp_path: Path) -> None:
    make_sop_layout(tmp_path, n_classes=6, per_class=4)
    plain = load_splits("sop", tmp_path)
    splits = load_splits("sop", tmp_path, val_fraction=0.25, seed=3)
    assert splits.val is not None
    assert splits.val.class_names == splits.train.class_names == plain.train.class_names
    assert len(splits.val) == 3 and len(splits.train) == 9
    assert sorted(map(str, paths(splits.train) + paths(splits.val))) == sorted(map(str, paths(plain.train)))
    assert paths(splits.test) == paths(plain.test)
    again = load_splits("sop", tmp_path, val_fraction=0.25, seed=3)
    assert again.val is not None and paths(again.val) == paths(splits.val)


def test_validation_arguments_are_checked(tmp_path: Path) -> None:
    make_cub_layout(tmp_path, n_classes=8, per_class=3)
    assert "use at most 2" in error_of(load_splits, "cub200", tmp_path, val_classes=3)
    assert "not both" in error_of(load_splits, "cub200", tmp_path, val_classes=1, val_fraction=0.5)
    assert "val_classes must be >= 0" in error_of(load_splits, "cub200", tmp_path, val_classes=-1)
    for frac in (-0.1, 1.0, 1.5):
        assert "val_fraction must lie in [0, 1)" in error_of(
            load_splits, "cub200", tmp_path, val_fraction=frac
        )


# --------------------------------------------------------------------------------------------
# Fashion-MNIST and digits


def test_read_idx_plain_and_gzip(tmp_path: Path) -> None:
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    (tmp_path / "a").write_bytes(idx_bytes(arr))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(fm.read_idx(tmp_path / "a"), arr)
    np.testing.assert_array_equal(fm.read_idx(tmp_path / "a.gz"), arr)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    (tmp_path / "l").write_bytes(idx_bytes(labels))
    np.testing.assert_array_equal(fm.read_idx(tmp_path / "l"), labels)


def test_read_idx_truncated_and_foreign_files(tmp_path: Path) -> None:
    data = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    cases = {
        "body": (data[:-5], "is truncated: 2347 bytes of data, expected 2352"),
        "header": (data[:9], "is truncated"),  # magic + 1.25 of 3 dims
        "tiny": (data[:2], "too short"),
        "magic": (b"\x89PNG\r\n\x1a\n" + data[8:], "is not a uint8 idx file"),
    }
    for name, (blob, phrase) in cases.items():
        (tmp_path / name).write_bytes(blob)
        assert phrase in error_of(fm.read_idx, tmp_path / name), name
    (tmp_path / "cut.gz").write_bytes(gzip.compress(data)[:-20])
    assert "cannot read" in error_of(fm.read_idx, tmp_path / "cut.gz")


def test_fashion_mnist_from_idx_files(tmp_path: Path) -> None:
    make_idx_files(tmp_path / "fashion-mnist", n_train=20, n_test=10)
    splits = fm.load_fashion_mnist(tmp_path)  # found in <root>/fashion-mnist
    assert (len(splits.train), len(splits.test)) == (15, 15)
    assert splits.train.class_names == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
    assert splits.test.class_names == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert splits.train.load_image(0).size == (28, 28)
    via_registry = load_splits("fashion-mnist", tmp_path / "fashion-mnist", val_classes=1)
    assert via_registry.val is not None and via_registry.val.class_names == ["Coat"]


def test_fashion_mnist_bad_files_are_reported(tmp_path: Path) -> None:
    root = make_idx_files(tmp_path, n_train=20, n_test=10, gz=False)
    data = (root / "t10k-images-idx3-ubyte").read_bytes()
    (root / "t10k-images-idx3-ubyte").write_bytes(data[: len(data) // 2])
    assert "is truncated" in error_of(fm.load_fashion_mnist, root)
    (root / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((10, 20, 20), np.uint8)))
    assert "expected 28x28 test images" in error_of(fm.load_fashion_mnist, root)
    msg = error_of(fm.load_fashion_mnist_or_digits, tmp_path / "elsewhere")
    assert "Fashion-MNIST not found under --data-root" in msg  # a named folder never falls back


def test_digits_splits() -> None:
    splits = load_splits("digits")
    assert splits.train.class_names == ["0", "1", "2", "3", "4"]
    assert splits.test.class_names == ["5", "6", "7", "8", "9"]
    assert len(splits.train) + len(splits.test) == 1797
    assert splits.train.load_image(0).size == (8, 8) and splits.train.load_image(0).mode == "L"
    assert splits.train.images.max() > 200  # type: ignore[attr-defined]  # scaled 0..16 -> 0..255


def test_fashion_mnist_falls_back_to_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setattr(fm, "default_data_dir", lambda: tmp_path / "data")
    calls: list[object] = []

    def offline(target: Path | None = None) -> Path:
        calls.append(target)
        raise DatasetError("could not download Fashion-MNIST: offline")

    monkeypatch.setattr(fm, "download_fashion_mnist", offline)
    splits = load_splits("fashion-mnist")
    assert calls == [None]
    assert splits.name == "digits" and len(splits.train) + len(splits.test) == 1797
    assert any("falling back to scikit-learn's digits" in n and "offline" in n for n in splits.notes)


def test_fashion_mnist_found_in_debian_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "DEBIAN_DIR", make_idx_files(tmp_path / "debian"))
    monkeypatch.setattr(fm, "default_data_dir", lambda: tmp_path / "data")
    splits = load_splits("fashion-mnist")
    assert splits.name == "fashion-mnist" and splits.source == str(tmp_path / "debian")


# --------------------------------------------------------------------------------------------
# downloads


def _tgz(src: Path, arcroot: str, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(src, arcname=arcroot)
    return out


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.name.startswith(".") or p.suffix in (".tmp", ".part"))


def test_download_cub_from_file_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cub_layout(tmp_path / "src", n_classes=4, per_class=2)
    archive = _tgz(tmp_path / "src" / "CUB_200_2011", "CUB_200_2011", tmp_path / "CUB_200_2011.tgz")
    monkeypatch.setitem(dl.URLS, "cub200", (archive.as_uri(),))
    seen: list[tuple[int, int | None]] = []
    root = tmp_path / "data"
    out = dl.download_dataset("cub200", root, progress=lambda done, total: seen.append((done, total)))
    assert out == root / "CUB_200_2011"
    assert seen and seen[-1][0] == archive.stat().st_size
    check_splits(load_cub200(root), 4, 4, 2, 2)
    assert not (root / "CUB_200_2011.tgz").exists()  # the archive is removed once extracted
    assert _leftovers(root) == []
    # already there: nothing is fetched (the URL is now unreachable)
    monkeypatch.setitem(dl.URLS, "cub200", ("http://127.0.0.1:9/CUB_200_2011.tgz",))
    assert dl.download_dataset("cub200", root) == out


def test_download_default_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_image_folder(tmp_path / "src")
    monkeypatch.setenv("DAS_DATA_DIR", str(tmp_path / "data"))
    make_sop_layout(tmp_path / "src2", n_classes=4, per_class=2)
    archive = tmp_path / "Stanford_Online_Products.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted((tmp_path / "src2").rglob("*")):
            zf.write(p, p.relative_to(tmp_path / "src2").as_posix())
    monkeypatch.setitem(dl.URLS, "sop", (archive.as_uri(),))
    out = dl.download_dataset("sop")
    assert out == tmp_path / "data" / "sop" / "Stanford_Online_Products"
    check_splits(load_sop(None), 4, 4, 2, 2)


def test_download_cars_fetches_two_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_cars_layout(tmp_path / "src", n_classes=4, per_class=2)
    archive = _tgz(src / "car_ims", "car_ims", tmp_path / "car_ims.tgz")
    monkeypatch.setitem(dl.URLS, "cars196", (archive.as_uri(), (src / "cars_annos.mat").as_uri()))
    root = tmp_path / "data"
    assert dl.download_dataset("cars196", root) == root
    assert (root / "cars_annos.mat").is_file() and not (root / "car_ims.tgz").exists()
    check_splits(load_cars196(root), 4, 4, 2, 2)


def test_download_offline_names_url_error_and_manual_route(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "http://127.0.0.1:9/x.tgz"
    monkeypatch.setitem(dl.URLS, "cub200", (url,))
    root = tmp_path / "data"
    msg = error_of(dl.download_dataset, "cub200", root, timeout=5)
    assert f"could not download {url}" in msg
    assert "refused" in msg.lower()
    assert f"extract CUB_200_2011.tgz into {root}" in msg and "offline" in msg
    assert list(root.iterdir()) == []  # no partial file left behind


def test_download_missing_file_url_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(dl.URLS, "sop", ((tmp_path / "absent.zip").as_uri(),))
    msg = error_of(dl.download_dataset, "sop", tmp_path / "d")
    assert "absent.zip" in msg and "Stanford_Online_Products.zip" in msg
    assert list((tmp_path / "d").iterdir()) == []


def test_download_result_without_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "src" / "other").mkdir(parents=True)
    (tmp_path / "src" / "other" / "a.txt").write_text("x")
    archive = _tgz(tmp_path / "src" / "other", "other", tmp_path / "CUB_200_2011.tgz")
    monkeypatch.setitem(dl.URLS, "cub200", (archive.as_uri(),))
    msg = error_of(dl.download_dataset, "cub200", tmp_path / "d")
    assert "does not have the expected layout" in msg and "images.txt not found" in msg


def test_download_unknown_name_and_fashion_mnist_delegation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "downloadable datasets are: cub200, cars196, sop, fashion-mnist" in error_of(
        dl.download_dataset, "mnist"
    )
    calls: list[Path | None] = []

    def fake(target: Path | None = None) -> Path:
        calls.append(target)
        return make_idx_files(tmp_path / "fm" / "FashionMNIST" / "raw")

    monkeypatch.setattr(fm, "download_fashion_mnist", fake)
    out = dl.download_dataset("fashion-mnist", tmp_path / "fm")
    assert calls == [tmp_path / "fm"] and out == tmp_path / "fm" / "FashionMNIST" / "raw"
    assert dl.download_dataset("fashion-mnist", tmp_path / "fm") == out and len(calls) == 1  # found: no fetch


def test_download_resumes_without_refetching_what_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_cars_layout(tmp_path / "src", n_classes=4, per_class=2)
    root = make_cars_layout(tmp_path / "data", n_classes=4, per_class=2)
    (root / "cars_annos.mat").unlink()  # an earlier run got car_ims/ but not the annotations
    unreachable = "http://127.0.0.1:9/car_ims.tgz"
    monkeypatch.setitem(dl.URLS, "cars196", (unreachable, (src / "cars_annos.mat").as_uri()))
    assert dl.download_dataset("cars196", root) == root
    check_splits(load_cars196(root), 4, 4, 2, 2)


def test_download_of_a_broken_archive_removes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cub_layout(tmp_path / "src", n_classes=2, per_class=1)
    archive = _tgz(tmp_path / "src" / "CUB_200_2011", "CUB_200_2011", tmp_path / "CUB_200_2011.tgz")
    archive.write_bytes(archive.read_bytes()[:-300])
    monkeypatch.setitem(dl.URLS, "cub200", (archive.as_uri(),))
    root = tmp_path / "d"
    msg = error_of(dl.download_dataset, "cub200", root)
    assert "cannot extract" in msg and "removed CUB_200_2011.tgz, run again to re-download" in msg
    assert list(root.iterdir()) == []


# --------------------------------------------------------------------------------------------
# safe extraction


def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(
    ("member", "phrase"),
    [
        (_info("../evil"), "a '..' component"),
        (_info("ok/../../evil"), "a '..' component"),
        (_info("/tmp/evil_abs"), "an absolute path"),
        (_info("ok/link", tarfile.SYMTYPE, "../../evil"), "a symbolic link to '../../evil', outside"),
        (_info("ok/link", tarfile.SYMTYPE, "/etc/passwd"), "a symbolic link to '/etc/passwd', outside"),
        (_info("ok/hard", tarfile.LNKTYPE, "../evil"), "a hard link to '../evil', outside"),
        (_info("ok/dev", tarfile.CHRTYPE), "a device, FIFO or other special file"),
    ],
)
def test_unsafe_tar_is_refused_and_nothing_extracted(
    tmp_path: Path, member: tarfile.TarInfo, phrase: str
) -> None:
    good = _info("ok/first.txt")
    data = None if member.type in (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE) else b"pwned"
    archive = _tar_with(tmp_path / "bad.tgz", [(good, b"fine"), (member, data)])
    dest = tmp_path / "out" / "inner"
    msg = error_of(dl.safe_extract, archive, dest)
    assert "refusing to extract" in msg and phrase in msg
    assert list(dest.iterdir()) == []  # not even the good member before it
    assert not (tmp_path / "out" / "evil").exists() and not (tmp_path / "evil").exists()


def test_safe_tar_with_inner_symlink_is_extracted(tmp_path: Path) -> None:
    archive = _tar_with(
        tmp_path / "ok.tgz",
        [(_info("d/a.txt"), b"hello"), (_info("d/link.txt", tarfile.SYMTYPE, "a.txt"), None)],
    )
    top = dl.safe_extract(archive, tmp_path / "out")
    assert top == [tmp_path / "out" / "d"]
    assert (tmp_path / "out" / "d" / "link.txt").read_text() == "hello"


@pytest.mark.parametrize(
    ("name", "phrase"), [("../evil", "'..'"), ("/evil", "absolute"), ("a\\..\\evil", "'..'")]
)
def test_unsafe_zip_is_refused(tmp_path: Path, name: str, phrase: str) -> None:
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("fine.txt", "ok")
        zf.writestr(zipfile.ZipInfo(name), "pwned")
    dest = tmp_path / "out"
    msg = error_of(dl.safe_extract, archive, dest)
    assert "refusing to extract" in msg and phrase in msg
    assert list(dest.iterdir()) == [] and not (tmp_path / "evil").exists()


def test_zip_symlink_member_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    info = zipfile.ZipInfo("link")
    info.external_attr = 0o120777 << 16
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(info, "../../etc/passwd")
    assert "a symbolic link" in error_of(dl.safe_extract, archive, tmp_path / "out")


def test_truncated_archive_is_reported(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "src")
    archive = _tgz(tmp_path / "src", "src", tmp_path / "a.tgz")
    archive.write_bytes(archive.read_bytes()[:-200])
    msg = error_of(dl.safe_extract, archive, tmp_path / "out")
    assert "cannot extract" in msg and "is the download complete?" in msg
    assert [p for p in (tmp_path / "out").iterdir()] == []
    assert "not a .tgz" in error_of(dl.safe_extract, tmp_path / "a.rar", tmp_path / "out")


def test_extraction_merges_into_existing_tree(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    (dest / "d").mkdir(parents=True)
    (dest / "d" / "keep.txt").write_text("mine")
    archive = _tar_with(tmp_path / "x.tar.gz", [(_info("d/new.txt"), b"new")])
    dl.safe_extract(archive, dest)
    assert sorted(os.listdir(dest / "d")) == ["keep.txt", "new.txt"]
    assert _leftovers(dest) == []
