"""Sprite sheets of item thumbnails, for the map's hover tooltips.

A sheet is a PNG of ``per_row × per_row`` square cells of ``size`` px; item ``i`` is in
sheet ``i // per_sheet`` at column ``(i % per_sheet) % per_row`` and row
``(i % per_sheet) // per_row``. Each thumbnail is letterboxed (aspect kept, centred, black
borders) into its cell; an image that cannot be read becomes a grey cell. ``sprites.json``
describes the sheets. Building is idempotent: sheets already written are reused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from das_core.store.cache import CacheMiss, DiskCache
from das_core.store.io import atomic_write, atomic_write_json

if TYPE_CHECKING:
    from PIL import Image

    from das_core.data.base import DMLDataset

log = logging.getLogger(__name__)

SPRITES_JSON = "sprites.json"
SPRITE_FORMAT = 1
PLACEHOLDER_GREY = 128
DEFAULT_SIZE = 64
NATIVE_MAX = 32


@dataclass
class SpriteInfo:
    """Where each item's thumbnail is: ``size`` px cells, ``per_row`` cells a side per sheet,
    ``per_sheet = per_row²`` items per sheet, ``count`` items, ``files`` sheet names (relative
    to the sprites folder), ``mode`` ``"L"`` or ``"RGB"``; ``broken``: items drawn as grey
    placeholders."""

    size: int
    per_row: int
    per_sheet: int
    count: int
    files: list[str]
    mode: str
    broken: list[int] = field(default_factory=list)
    format: int = SPRITE_FORMAT

    def locate(self, index: int) -> tuple[str, int, int]:
        """``(sheet file, x px, y px)`` of item ``index``'s cell (top-left corner)."""
        if not 0 <= index < self.count:
            raise IndexError(f"item {index} is outside 0..{self.count - 1}")
        sheet, cell = divmod(int(index), self.per_sheet)
        row, col = divmod(cell, self.per_row)
        return self.files[sheet], col * self.size, row * self.size

    def save(self, out_dir: str | Path) -> Path:
        path = Path(out_dir) / SPRITES_JSON
        atomic_write_json(path, asdict(self))
        return path

    @classmethod
    def load(cls, out_dir: str | Path) -> SpriteInfo:
        raw = json.loads((Path(out_dir) / SPRITES_JSON).read_text(encoding="utf-8"))
        info = cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        if info.format != SPRITE_FORMAT or info.per_sheet != info.per_row**2:
            raise ValueError(f"{out_dir}: unsupported sprites.json")
        return info


def load_sprites(out_dir: str | Path) -> SpriteInfo | None:
    """The sprites of ``out_dir`` when they are complete, else ``None``."""
    try:
        info = SpriteInfo.load(out_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if all((Path(out_dir) / f).is_file() for f in info.files):
        return info
    return None


def thumbnail_of(info: SpriteInfo, out_dir: str | Path, index: int) -> Image.Image:
    """The thumbnail cell of item ``index`` cut from its sheet."""
    from PIL import Image

    name, x, y = info.locate(index)
    with Image.open(Path(out_dir) / name) as sheet:
        return sheet.crop((x, y, x + info.size, y + info.size)).copy()


def _native(dataset: DMLDataset) -> tuple[int, int, str] | None:
    """``(height, width, mode)`` of an in-memory array dataset, else ``None``."""
    images = getattr(dataset, "images", None)
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim in (3, 4):
        if images.ndim == 3:
            return int(images.shape[1]), int(images.shape[2]), "L"
        if images.shape[3] == 3:
            return int(images.shape[1]), int(images.shape[2]), "RGB"
    return None


def default_size(dataset: DMLDataset) -> int:
    """The native size for small grey array images (≤ 32 px, e.g. Fashion-MNIST's 28), else
    64 px."""
    nat = _native(dataset)
    if nat is not None and nat[2] == "L" and max(nat[0], nat[1]) <= NATIVE_MAX:
        return max(nat[0], nat[1])
    return DEFAULT_SIZE


def _fit_box(h: int, w: int, size: int) -> tuple[int, int]:
    scale = size / max(h, w)
    return max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))


def _array_cells(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """``(n, size, size[, 3])`` letterboxed cells of a uint8 image batch (nearest-neighbour
    resampling, vectorised: no per-item PIL call)."""
    n, h, w = images.shape[:3]
    nh, nw = _fit_box(h, w, size)
    if (nh, nw) != (h, w):
        rows = np.minimum((np.arange(nh) + 0.5) * h / nh, h - 1).astype(np.intp)
        cols = np.minimum((np.arange(nw) + 0.5) * w / nw, w - 1).astype(np.intp)
        images = images[:, rows][:, :, cols]
    shape = (n, size, size) if channels == 1 else (n, size, size, 3)
    cells = np.zeros(shape, np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    cells[:, top : top + nh, left : left + nw] = images
    return cells


def _tile(cells: np.ndarray, per_row: int) -> np.ndarray:
    """Cells ``(n ≤ per_row², s, s[, 3])`` into one sheet ``(per_row·s, per_row·s[, 3])``."""
    n, s = cells.shape[0], cells.shape[1]
    full = np.zeros((per_row * per_row, *cells.shape[1:]), np.uint8)
    full[:n] = cells
    grid = full.reshape(per_row, per_row, s, s, *cells.shape[3:])
    grid = np.swapaxes(grid, 1, 2)  # (row, y, col, x[, c])
    return grid.reshape(per_row * s, per_row * s, *cells.shape[3:])


def _file_cells(dataset: DMLDataset, indices: range, size: int, mode: str, broken: list[int]) -> np.ndarray:
    from das_core.data.images import thumbnail

    shape = (len(indices), size, size) if mode == "L" else (len(indices), size, size, 3)
    cells = np.zeros(shape, np.uint8)
    for k, i in enumerate(indices):
        try:
            thumb = thumbnail(dataset.load_image(i), size).convert(mode)
            arr = np.asarray(thumb, dtype=np.uint8)
            h, w = arr.shape[:2]
            top, left = (size - h) // 2, (size - w) // 2
            cells[k, top : top + h, left : left + w] = arr
        except Exception as exc:  # any unreadable item: a grey cell, never a crash
            log.warning("thumbnail of %s failed (%s): grey placeholder", dataset.describe_item(i), exc)
            cells[k] = PLACEHOLDER_GREY
            broken.append(int(i))
    return cells


def _sheet_ok(path: Path, side: int, mode: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return bool(im.size == (side, side) and im.mode == mode)
    except Exception:
        return False


def _geometry(dataset: DMLDataset, size: int | None, per_row: int) -> tuple[int, str, list[str]]:
    """``(cell size, mode, sheet file names)`` of the sprites of ``dataset``."""
    size = int(size) if size is not None else default_size(dataset)
    if size < 1 or per_row < 1:
        raise ValueError(f"size and per_row must be >= 1, got {size} and {per_row}")
    nat = _native(dataset)
    mode = nat[2] if nat is not None else "RGB"
    count = len(dataset)
    n_sheets = -(-count // (per_row * per_row))
    stem = f"sheet-{mode.lower()}{size}-r{per_row}-n{count}"
    return size, mode, [f"{stem}-{k:04d}.png" for k in range(n_sheets)]


def build_sprites(
    dataset: DMLDataset,
    out_dir: str | Path,
    *,
    size: int | None = None,
    per_row: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> SpriteInfo:
    """Write the thumbnails of every item of ``dataset`` as PNG sprite sheets in ``out_dir``
    and return (and save, as ``sprites.json``) their ``SpriteInfo``.

    ``size`` defaults to the native size of small grey array images (Fashion-MNIST: 28 px),
    else 64 px. In-memory ``ArrayDataset``s are tiled with numpy; file datasets go through
    ``load_image`` and ``das_core.data.images.thumbnail``, and an unreadable image becomes a grey
    cell. Sheets already in ``out_dir`` for the same geometry are reused (an interrupted
    build resumes). ``progress(items done, total)``.
    """
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size, mode, files = _geometry(dataset, size, per_row)
    nat = _native(dataset)
    count = len(dataset)
    per_sheet = per_row * per_row
    previous = load_sprites(out)
    broken: list[int] = []
    if previous is not None and previous.files == files and previous.mode == mode:
        broken = list(previous.broken)
    side = per_row * size
    for k, name in enumerate(files):
        lo, hi = k * per_sheet, min(count, (k + 1) * per_sheet)
        path = out / name
        if not _sheet_ok(path, side, mode):
            broken = [b for b in broken if not lo <= b < hi]
            if nat is not None:
                images = dataset.images[lo:hi]  # type: ignore[attr-defined]
                cells = _array_cells(images, size, 1 if mode == "L" else 3)
            else:
                cells = _file_cells(dataset, range(lo, hi), size, mode, broken)
            sheet = Image.fromarray(_tile(cells, per_row))  # (H, W) uint8 -> L, (H, W, 3) -> RGB

            def write(tmp: Path, sheet: Image.Image = sheet) -> None:
                sheet.save(tmp, format="PNG", compress_level=6)

            atomic_write(path, write)
        if progress is not None:
            progress(hi, count)
    info = SpriteInfo(
        size=size,
        per_row=per_row,
        per_sheet=per_sheet,
        count=count,
        files=files,
        mode=mode,
        broken=sorted(set(broken)),
    )
    info.save(out)
    return info


def _read_sprites(out_dir: Path) -> SpriteInfo:
    if not (out_dir / SPRITES_JSON).is_file():
        raise CacheMiss(f"no {SPRITES_JSON}")
    return SpriteInfo.load(out_dir)


# Sheets are written one by one as they are built (an interrupted build resumes), and
# ``sprites.json`` last: the entry's write step has nothing left to do.
SPRITES: DiskCache[SpriteInfo] = DiskCache(
    "sprites", SPRITE_FORMAT, read=_read_sprites, write=lambda out, info: None, lock=".sprites.lock"
)


def cached_sprites(
    identity: str, split: str, dataset: DMLDataset, *, root: Path, per_row: int = 32
) -> tuple[SpriteInfo, Path]:
    """The sprite sheets of ``dataset`` (split ``split`` under the checkpoint ``identity``) in
    the cache under ``root`` (e.g. a folder a web server serves), built when absent, partial
    or of another geometry; and the folder that holds them, relative to ``root``."""
    out = SPRITES.path(identity, split, root=root)
    size, mode, files = _geometry(dataset, None, per_row)

    def complete(info: SpriteInfo) -> bool:
        side = per_row * size
        return (
            info.files == files
            and info.mode == mode
            and info.size == size
            and all(_sheet_ok(out / f, side, mode) for f in files)
        )

    info = SPRITES.get_at(out, lambda: build_sprites(dataset, out, per_row=per_row), accept=complete)
    return info, out.relative_to(root)


def sprite_metadata(info: SpriteInfo) -> dict[str, Any]:
    """The sprite geometry as a plain dict (for the app's front end)."""
    return asdict(info)
