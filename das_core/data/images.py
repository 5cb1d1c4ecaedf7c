"""Opening images whatever they are: uploads and dataset files alike.

Refuses (with ``ImageError``) non-image bytes, truncated files and decompression bombs;
normalises everything else to 8-bit ``L`` or ``RGB``: the first frame of an animation,
EXIF rotation applied, 16-bit and 32-bit grey scaled down, palette and CMYK converted,
transparency composited onto a background.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Above this many pixels an image is refused (a decompression bomb, or simply too large to
# be a query). 64 MP covers every photo camera; PIL's own default warns at 89 MP.
MAX_PIXELS = 64_000_000
# Uploads larger than this many bytes are refused before decoding.
MAX_UPLOAD_BYTES = 32 * 1024 * 1024

ImageFile.LOAD_TRUNCATED_IMAGES = False

log = logging.getLogger(__name__)


class ImageError(ValueError):
    """The bytes are not an image this project can use; the message says why."""


def _refuse_truncated() -> None:
    """PIL's switch is process-wide: if other code turned on ``LOAD_TRUNCATED_IMAGES`` (a
    common line in training scripts), truncated files would load silently, grey-filled.
    Turn it back off (no lock: decoding in threads stays parallel)."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        log.warning(
            "PIL's ImageFile.LOAD_TRUNCATED_IMAGES was set to True elsewhere; das_core.data.images sets it "
            "back to False, since truncated images must be refused"
        )
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def _size(n: int) -> str:
    return f"{n} bytes" if n < 1_000_000 else f"{n / 1e6:.1f} MB"


def _pixels(n: int) -> str:
    return f"{n} pixels" if n < 1_000_000 else f"{n / 1e6:.0f} MP"


def _read_stream(stream: BinaryIO, limit: int | None) -> bytes:
    """All of ``stream``, or (with ``limit``) at most ``limit + 1`` bytes, short reads allowed."""
    if limit is None:
        return stream.read()
    parts: list[bytes] = []
    got = 0
    while got <= limit:
        chunk = stream.read(limit + 1 - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def open_image(
    source: str | Path | bytes | BinaryIO,
    *,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int | None = None,
    name: str | None = None,
) -> Image.Image:
    """Decode ``source`` (a path, bytes or a binary file object) into a loaded 8-bit
    ``L``, ``LA``, ``RGB`` or ``RGBA`` image. Raises ``ImageError`` with a clear reason."""
    label = name or (str(source) if isinstance(source, str | Path) else "the image")
    data: bytes
    if isinstance(source, str | Path):
        path = Path(source)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ImageError(f"{label}: cannot read the file ({exc.strerror or exc})") from exc
        if max_bytes is not None and size > max_bytes:
            raise ImageError(f"{label}: {_size(size)} is over the {_size(max_bytes)} limit")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"{label}: cannot read the file ({exc.strerror or exc})") from exc
    elif isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:  # a stream (an upload): never read more than the limit allows
        data = _read_stream(source, max_bytes)
        if max_bytes is not None and len(data) > max_bytes:
            raise ImageError(f"{label}: more than {_size(max_bytes)} is over the {_size(max_bytes)} limit")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageError(f"{label}: {_size(len(data))} is over the {_size(max_bytes)} limit")
    if not data:
        raise ImageError(f"{label}: the file is empty")
    try:
        _refuse_truncated()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(
                    f"{label}: {w}x{h} = {_pixels(w * h)} is over the {_pixels(max_pixels)} limit "
                    "(a decompression bomb, or an image to downscale first)"
                )
            if w < 1 or h < 1:
                raise ImageError(f"{label}: the image has no pixels ({w}x{h})")
            # animated GIF/WebP/PNG, multi-page TIFF: the first frame. (Not via ``is_animated``,
            # which parses the later frames and crashes with IndexError on a damaged one.)
            if img.tell() != 0:
                img.seek(0)
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{label}: refused as a decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{label}: not an image (PIL recognises no image format in these bytes)") from exc
    except Exception as exc:  # OSError, SyntaxError, EOFError... and struct.error, IndexError
        # from PIL's pure-Python parsers on crafted bytes: whatever the decoder hit, it is corrupt
        raise ImageError(f"{label}: the image is truncated or corrupt ({exc})") from exc
    out: Image.Image = img
    with contextlib.suppress(Exception):  # a broken EXIF block must not lose an otherwise good image
        out = ImageOps.exif_transpose(img) or img
    return _to_8bit(out)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Any mode to one of L, LA, RGB, RGBA (8 bits per channel)."""
    mode = img.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        else:  # 32-bit int or float: stretch the observed range
            finite = arr[np.isfinite(arr)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
            arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if mode == "P" or mode == "PA":
        has_alpha = "transparency" in img.info or mode == "PA"
        return img.convert("RGBA" if has_alpha else "RGB")
    if mode == "CMYK":
        return img.convert("RGB")
    if mode in ("YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    if mode == "La":
        return img.convert("LA")
    if mode == "RGBa":
        return img.convert("RGBA")
    return img.convert("RGBA" if "A" in mode else "RGB")


def to_mode(img: Image.Image, mode: str, *, background: int = 0) -> Image.Image:
    """``img`` as ``L`` or ``RGB``, transparent pixels composited onto grey level ``background``."""
    img = _to_8bit(img)
    if img.mode in ("LA", "RGBA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (background, background, background, 255))
        img = Image.alpha_composite(canvas, rgba).convert("RGB")
    if img.mode == mode:
        return img
    return img.convert(mode)


def thumbnail(img: Image.Image, size: int = 64) -> Image.Image:
    """A copy no larger than ``size`` px on its longer side (small images are scaled up with
    nearest neighbour so that 28x28 items stay crisp)."""
    img = _to_8bit(img)  # colour is judged after conversion: CMYK, YCbCr, P... stay colour
    img = to_mode(img, "RGB" if img.mode in ("RGB", "RGBA") else "L", background=0)
    w, h = img.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    return img.resize(new, resample)
