"""The explorer's disk caches: embeddings per checkpoint and split, file keys, and the
thumbnail sprite sheets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import das_core.embed
from das_core import cache, thumbs
from das_core.cache import cache_root, file_key, get_embeddings, load_cached_embeddings
from das_core.data.base import ArrayDataset, DatasetSplits, FileDataset
from das_core.thumbs import SpriteInfo, build_sprites, load_sprites, thumbnail_of


def test_cache_root_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setenv("DAS_CACHE_DIR", str(tmp_path / "c"))
        assert cache_root() == tmp_path / "c"
        m.delenv("DAS_CACHE_DIR")
        assert cache_root() == Path(cache.__file__).resolve().parent.parent / ".cache" / "explorer"
    assert os.environ.get("DAS_CACHE_DIR")  # the test session's isolated cache is back


def test_file_key_changes_with_content(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"first version")
    k1 = file_key(f)
    assert len(k1) == 16 and int(k1, 16) >= 0
    assert file_key(f) == k1
    f.write_bytes(b"second version!")
    os.utime(f, ns=(1, 1))  # even with an old mtime, a new size gives a new memo entry
    k2 = file_key(f)
    assert k2 != k1
    g = tmp_path / "copy.safetensors"
    g.write_bytes(b"second version!")
    assert file_key(g) == k2  # keyed by content, not by name


@dataclass
class FakeConfig:
    eval_batch_size: int = 64


@dataclass
class FakeCheckpoint:
    path: Path
    config: FakeConfig
    dataset: str = "toy"

    def build_model(self, device: Any = "cpu") -> object:
        return object()


def toy_splits(n: int = 30) -> DatasetSplits:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(n, 8, 8), dtype=np.uint8)
    labels = np.arange(n) % 3
    ds = ArrayDataset("toy", "test", imgs, labels, ["a", "b", "c"])
    return DatasetSplits("toy", train=ds, test=ds)


def test_get_embeddings_cached_and_corruption_recomputed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt_file = tmp_path / "m.safetensors"
    ckpt_file.write_bytes(b"weights")
    ckpt = FakeCheckpoint(ckpt_file, FakeConfig())
    calls: list[int] = []

    def fake_embed(model: object, dataset: Any, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(dataset))
        if kw.get("progress"):
            kw["progress"](len(dataset), len(dataset))
        emb = np.arange(len(dataset) * 4, dtype=np.float32).reshape(-1, 4)
        return emb, dataset.labels.copy()

    monkeypatch.setattr(das_core.embed, "embed_dataset", fake_embed)
    splits = toy_splits()
    seen: list[tuple[int, int]] = []
    es = get_embeddings(ckpt, "test", splits=splits, progress=lambda d, t: seen.append((d, t)))  # type: ignore[arg-type]
    assert calls == [30] and seen == [(30, 30)]
    assert es.embeddings.shape == (30, 4) and es.embeddings.dtype == np.float32
    assert es.labels.dtype == np.int64 and es.class_names == ["a", "b", "c"]
    assert es.checkpoint_key == file_key(ckpt_file) and es.dataset == "toy" and es.split == "test"

    again = get_embeddings(ckpt, "test", splits=splits)  # type: ignore[arg-type]
    assert calls == [30]  # read from disk, the model was not run
    np.testing.assert_array_equal(again.embeddings, es.embeddings)
    np.testing.assert_array_equal(again.labels, es.labels)
    assert load_cached_embeddings(es.checkpoint_key, "test") is not None

    folder = cache_root() / es.checkpoint_key / "test"
    (folder / "embeddings.npy").write_bytes(b"garbage, not an npy file")
    third = get_embeddings(ckpt, "test", splits=splits)  # type: ignore[arg-type]
    assert calls == [30, 30]
    np.testing.assert_array_equal(third.embeddings, es.embeddings)

    # same shape, different bytes: the checksum catches it
    np.save(folder / "embeddings.npy", np.zeros((30, 4), np.float32))
    get_embeddings(ckpt, "test", splits=splits)  # type: ignore[arg-type]
    assert calls == [30, 30, 30]
    # a missing meta.json (interrupted write) is recomputed too
    (folder / "meta.json").unlink()
    get_embeddings(ckpt, "test", splits=splits)  # type: ignore[arg-type]
    assert len(calls) == 4

    # a changed checkpoint file is a different entry
    ckpt_file.write_bytes(b"retrained weights")
    other = get_embeddings(ckpt, "test", splits=splits)  # type: ignore[arg-type]
    assert other.checkpoint_key != es.checkpoint_key and len(calls) == 5


# ---------------------------------------------------------------------------- sprites


def grey_dataset(n: int = 70) -> ArrayDataset:
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return ArrayDataset("fm", "test", imgs, np.zeros(n, np.int64), ["x"])


def test_sprites_array_geometry_and_pixels(tmp_path: Path) -> None:
    ds = grey_dataset(70)
    info = build_sprites(ds, tmp_path, per_row=4)
    assert (info.size, info.per_row, info.per_sheet, info.count, info.mode) == (28, 4, 16, 70, "L")
    assert len(info.files) == 5 and info.broken == []
    with Image.open(tmp_path / info.files[0]) as im:
        assert im.size == (112, 112) and im.mode == "L"
    for i in (0, 5, 17, 69):
        sheet, cell = divmod(i, 16)
        name, x, y = info.locate(i)
        assert name == info.files[sheet] and (x, y) == ((cell % 4) * 28, (cell // 4) * 28)
        arr = np.asarray(Image.open(tmp_path / name))[y : y + 28, x : x + 28]
        np.testing.assert_array_equal(arr, ds.images[i])
        np.testing.assert_array_equal(np.asarray(thumbnail_of(info, tmp_path, i)), ds.images[i])
    # the last sheet's unused cells are empty
    last = np.asarray(Image.open(tmp_path / info.files[4]))
    assert last[56:, :].max() == 0 and last[28:56, 56:].max() == 0  # items 64-69: 1.5 rows
    assert SpriteInfo.load(tmp_path) == info


def test_sprites_rgb_letterboxed(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, size=(3, 10, 20, 3), dtype=np.uint8)
    ds = ArrayDataset("c", "test", imgs, np.zeros(3, np.int64), ["x"])
    info = build_sprites(ds, tmp_path, per_row=2)
    assert info.size == 64 and info.mode == "RGB"
    cell = np.asarray(thumbnail_of(info, tmp_path, 1))
    assert cell.shape == (64, 64, 3)
    assert cell[:16].max() == 0 and cell[48:].max() == 0  # black bars above and below
    # nearest-neighbour upscale x3.2: the top-left source pixel fills the top-left of the band
    np.testing.assert_array_equal(cell[16, 0], imgs[1, 0, 0])
    np.testing.assert_array_equal(cell[47, 63], imgs[1, 9, 19])


def test_sprites_file_dataset_broken_image_is_grey(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    paths = []
    for i in range(3):
        p = src / f"{i}.png"
        Image.fromarray(np.full((12, 6, 3), 40 * (i + 1), np.uint8)).save(p)
        paths.append(p)
    paths[1].write_bytes(b"not an image")
    ds = FileDataset("f", "test", paths, np.zeros(3, np.int64), ["x"])
    out = tmp_path / "sprites"
    info = build_sprites(ds, out, size=16, per_row=2)
    assert info.broken == [1] and info.mode == "RGB"
    good = np.asarray(thumbnail_of(info, out, 0))
    assert good[:, 4:12].min() == 40 and good[:, :4].max() == 0  # 8x16 letterboxed left/right
    np.testing.assert_array_equal(np.asarray(thumbnail_of(info, out, 1)), np.full((16, 16, 3), 128, np.uint8))


def test_sprites_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = grey_dataset(40)
    info = build_sprites(ds, tmp_path, per_row=4)
    mtimes = {f: (tmp_path / f).stat().st_mtime_ns for f in info.files}

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("rebuilt a sheet that was already there")

    with monkeypatch.context() as m:
        m.setattr(thumbs, "_array_cells", boom)
        assert build_sprites(ds, tmp_path, per_row=4) == info
    assert {f: (tmp_path / f).stat().st_mtime_ns for f in info.files} == mtimes
    # a missing or corrupt sheet is rebuilt, the others are kept
    (tmp_path / info.files[1]).write_bytes(b"broken")
    (tmp_path / info.files[2]).unlink()
    assert load_sprites(tmp_path) is None
    again = build_sprites(ds, tmp_path, per_row=4)
    assert again == info and load_sprites(tmp_path) == info
    assert (tmp_path / info.files[0]).stat().st_mtime_ns == mtimes[info.files[0]]


def test_explorer_map_builds_then_reuses_both_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from das_core import projection

    ckpt_file = tmp_path / "m.safetensors"
    ckpt_file.write_bytes(b"explorer weights")  # the cache is keyed by content: not another test's
    ckpt = FakeCheckpoint(ckpt_file, FakeConfig())
    rng = np.random.default_rng(0)
    calls: list[int] = []

    def fake_embed(model: object, dataset: Any, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(dataset))
        kw["progress"](len(dataset), len(dataset))
        return rng.normal(size=(len(dataset), 6)).astype(np.float32), dataset.labels.copy()

    monkeypatch.setattr(das_core.embed, "embed_dataset", fake_embed)
    seen: list[float] = []
    es, m = projection.explorer_map(
        ckpt, "test", splits=toy_splits(60), progress=lambda f, msg: seen.append(f)
    )  # type: ignore[arg-type]
    assert len(es) == len(m) == 60 and calls == [60]
    assert seen == sorted(seen) and seen[-1] == 1.0
    with monkeypatch.context() as mp:
        mp.setattr(projection, "fit_map", lambda *a, **k: pytest.fail("refitted"))
        es2, m2 = projection.explorer_map(ckpt, "test", splits=toy_splits(60))  # type: ignore[arg-type]
    assert calls == [60]
    np.testing.assert_array_equal(m2.coords, m.coords)
    np.testing.assert_array_equal(es2.embeddings, es.embeddings)
