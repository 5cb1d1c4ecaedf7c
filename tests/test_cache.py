"""The explorer's disk caches: embeddings per checkpoint and split, file keys, and the
thumbnail sprite sheets."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import das_core.models.embed
from conftest import REPO
from das_core.data.base import ArrayDataset, DatasetSplits, FileDataset
from das_core.explorer import thumbs
from das_core.explorer.thumbs import SpriteInfo, build_sprites, cached_sprites, load_sprites, thumbnail_of
from das_core.store.cache import (
    CacheMiss,
    DiskCache,
    cache_root,
    file_key,
    get_embeddings,
    load_cached_embeddings,
)
from das_core.store.io import atomic_write_text


def test_cache_root_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setenv("DAS_CACHE_DIR", str(tmp_path / "c"))
        assert cache_root() == tmp_path / "c"
        m.delenv("DAS_CACHE_DIR")
        assert cache_root() == REPO / ".cache" / "explorer"
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
    identity: str = ""

    def __post_init__(self) -> None:  # as load_checkpoint does: the file's identity at load
        self.identity = file_key(self.path)

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

    monkeypatch.setattr(das_core.models.embed, "embed_dataset", fake_embed)
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

    # a changed checkpoint file, loaded again, is a different entry
    ckpt_file.write_bytes(b"retrained weights")
    other = get_embeddings(FakeCheckpoint(ckpt_file, FakeConfig()), "test", splits=splits)  # type: ignore[arg-type]
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
    from das_core.explorer import maps

    ckpt_file = tmp_path / "m.safetensors"
    ckpt_file.write_bytes(b"explorer weights")  # the cache is keyed by content: not another test's
    ckpt = FakeCheckpoint(ckpt_file, FakeConfig())
    rng = np.random.default_rng(0)
    calls: list[int] = []

    def fake_embed(model: object, dataset: Any, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(dataset))
        kw["progress"](len(dataset), len(dataset))
        return rng.normal(size=(len(dataset), 6)).astype(np.float32), dataset.labels.copy()

    monkeypatch.setattr(das_core.models.embed, "embed_dataset", fake_embed)
    seen: list[float] = []
    es, m = maps.explorer_map(
        ckpt, "test", splits=toy_splits(60), progress=lambda f, msg: seen.append(f)
    )  # type: ignore[arg-type]
    assert len(es) == len(m) == 60 and calls == [60]
    assert seen == sorted(seen) and seen[-1] == 1.0
    with monkeypatch.context() as mp:
        mp.setattr(maps, "fit_map", lambda *a, **k: pytest.fail("refitted"))
        es2, m2 = maps.explorer_map(ckpt, "test", splits=toy_splits(60))  # type: ignore[arg-type]
    assert calls == [60]
    np.testing.assert_array_equal(m2.coords, m.coords)
    np.testing.assert_array_equal(es2.embeddings, es.embeddings)


# ---------------------------------------------------------------------------- the one cache


def _text_cache(version: int = 1, **kw: Any) -> DiskCache[str]:
    def read(path: Path) -> str:
        if not path.is_file():
            raise CacheMiss("absent")
        text = path.read_text(encoding="utf-8")
        if not text.startswith(f"v{version}:"):
            raise ValueError(f"not format {version}")
        return text.split(":", 1)[1]

    def write(path: Path, value: str) -> None:
        atomic_write_text(path, f"v{version}:{value}")

    return DiskCache("text", version, read=read, write=write, name="text", suffix=".txt", **kw)


def test_disk_cache_reads_through_keyed_by_identity_split_and_params() -> None:
    cache = _text_cache()
    calls: list[str] = []

    def compute(value: str) -> Callable[[], str]:
        return lambda: calls.append(value) or value  # type: ignore[func-returns-value]

    assert cache.get("a" * 16, "test", compute("one"), {"k": 1}) == "one"
    assert cache.get("a" * 16, "test", compute("two"), {"k": 1}) == "one" and calls == ["one"]
    assert cache.get("a" * 16, "test", compute("three"), {"k": 2}) == "three"  # other parameters
    assert cache.get("a" * 16, "train", compute("four"), {"k": 1}) == "four"  # other split
    assert cache.get("b" * 16, "test", compute("five"), {"k": 1}) == "five"  # other checkpoint
    path = cache.path("a" * 16, "test", {"k": 1})
    assert path.parent == cache_root() / ("a" * 16) / "test" and path.name.startswith("text-")
    assert path.suffix == ".txt"
    # another format version is another entry, and a file of another version is recomputed
    assert _text_cache(2).path("a" * 16, "test", {"k": 1}) != path
    path.write_text("v0:old", encoding="utf-8")
    assert cache.get("a" * 16, "test", compute("six"), {"k": 1}) == "six"
    assert cache.peek("a" * 16, "test", {"k": 1}) == "six"
    # a value the caller does not accept (stale) is recomputed
    assert cache.get("a" * 16, "test", compute("seven"), {"k": 1}, accept=lambda v: v != "six") == "seven"
    with pytest.raises(ValueError, match="invalid cache entry"):
        cache.path("a" * 16, "../x")


def test_disk_cache_one_computation_for_concurrent_callers() -> None:
    # fcntl locks belong to open file descriptions, so threads contend as processes do
    cache = _text_cache()
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def slow() -> str:
        calls.append(1)
        started.set()
        release.wait(10)
        return "value"

    first = ThreadPoolExecutor(1).submit(cache.get, "c" * 16, "test", slow, {"k": 1})
    assert started.wait(10)
    second = ThreadPoolExecutor(1).submit(cache.get, "c" * 16, "test", slow, {"k": 1})
    release.set()
    assert first.result(10) == second.result(10) == "value" and calls == [1]


def test_disk_cache_unsaved_value_kept_or_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Path, value: str) -> None:
        raise PermissionError("read-only cache")

    kept = dataclasses.replace(_text_cache(), write=refuse, keep_unsaved=True)
    assert kept.get("d" * 16, "test", lambda: "x", {"k": 1}) == "x"
    strict = dataclasses.replace(kept, keep_unsaved=False)
    with pytest.raises(PermissionError):
        strict.get("d" * 16, "test", lambda: "x", {"k": 1})


def test_cached_sprites_reuse_and_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = grey_dataset(40)
    root = tmp_path / "static"
    info, folder = cached_sprites("e" * 16, "test", ds, root=root, per_row=4)
    assert folder == Path("e" * 16) / "test" and load_sprites(root / folder) == info
    built: list[int] = []
    real = thumbs.build_sprites
    monkeypatch.setattr(thumbs, "build_sprites", lambda *a, **k: built.append(1) or real(*a, **k))
    assert cached_sprites("e" * 16, "test", ds, root=root, per_row=4) == (info, folder) and built == []
    (root / folder / info.files[1]).write_bytes(b"broken")  # a corrupt sheet: rebuilt
    assert cached_sprites("e" * 16, "test", ds, root=root, per_row=4)[0] == info and built == [1]
    assert cached_sprites("e" * 16, "test", ds, root=root, per_row=2)[0].per_row == 2  # other geometry
    assert built == [1, 1]
