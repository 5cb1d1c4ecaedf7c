"""Safe image opening (``das_core.data.images``) on generated files: one test per protection or
normalisation, each written so that it fails if that protection is removed."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from das_core.data.images import MAX_PIXELS, MAX_UPLOAD_BYTES, ImageError, open_image, thumbnail, to_mode

# --------------------------------------------------------------------------------------------
# builders


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((len(mode),) if mode != "L" else ())
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def bilevel_png(width: int, height: int, *, with_data: bool = True) -> bytes:
    """A valid all-black 1-bit greyscale PNG of any size, built by hand: each row is one filter
    byte plus width/8 zero bytes, so even 72 megapixels compress to a few kilobytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
    if with_data:
        comp = zlib.compressobj(9)
        row = bytes(1 + (width + 7) // 8)
        parts = [comp.compress(row) for _ in range(height)]
        out += _chunk(b"IDAT", b"".join(parts) + comp.flush())
    return out + _chunk(b"IEND", b"")


def assert_close(pixel: object, expected: tuple[int, ...], tol: int = 40) -> None:
    """A pixel within ``tol`` levels of ``expected`` per channel. The default is for lossy JPEG
    at quality 95 read inside a flat colour area, at least 5 px from any edge: quantisation,
    chroma subsampling and YCbCr/CMYK rounding move such a pixel by a few levels (decoders
    differ by +-1); 40 of 255 stays far from the 255-level error of a wrong conversion or
    orientation, which is what the tests look for."""
    assert isinstance(pixel, tuple)
    assert all(abs(int(a) - b) <= tol for a, b in zip(pixel, expected, strict=True)), (pixel, expected)


# --------------------------------------------------------------------------------------------
# refused inputs


def test_non_image_bytes() -> None:
    with pytest.raises(ImageError, match="not an image"):
        open_image(b"%PDF-1.7 definitely not a picture" * 10, name="upload.pdf")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png: the file is empty"):
        open_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="the file is empty"):
        open_image(b"")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read the file"):
        open_image(tmp_path / "nope.jpg")


def test_truncated_png() -> None:
    data = encode(noise((64, 64)), "PNG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        open_image(data[: len(data) // 2])


def test_truncated_jpeg() -> None:
    data = encode(noise((64, 64)), "JPEG", quality=95)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        open_image(data[: int(len(data) * 0.6)])


def test_truncated_image_refused_even_if_someone_enables_pil_leniency(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # e.g. set by another library
    data = encode(noise((64, 64)), "JPEG", quality=95)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        open_image(data[: int(len(data) * 0.6)])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bomb_over_our_limit_but_under_pils() -> None:
    # 9000 x 8000 = 72 MP: over MAX_PIXELS (64 MP) but under PIL's own 89 MP warning, so only
    # our check stands between this 10 kB file and a 72 MB decode
    data = bilevel_png(9000, 8000)
    assert len(data) < 20_000 and MAX_PIXELS < 9000 * 8000
    with pytest.raises(ImageError, match=r"9000x8000 = 72 MP is over the 64 MP limit"):
        open_image(data)


def test_decompression_bomb_header_only() -> None:
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(bilevel_png(20000, 20000, with_data=False))


def test_pixel_limit_is_exact() -> None:
    data = bilevel_png(100, 50)
    assert open_image(data, max_pixels=5000).size == (100, 50)
    with pytest.raises(ImageError, match="100x50 = 5000 pixels is over the 4999 pixels limit"):
        open_image(data, max_pixels=4999)


def test_upload_size_limit(tmp_path: Path) -> None:
    data = encode(noise((40, 40)), "PNG")
    path = tmp_path / "big.png"
    path.write_bytes(data)
    limit = len(data) - 1
    for source in (data, path):
        with pytest.raises(ImageError, match=rf"{len(data)} bytes is over the {limit} bytes limit"):
            open_image(source, max_bytes=limit)
    with pytest.raises(ImageError, match=rf"more than {limit} bytes is over the {limit} bytes limit"):
        open_image(io.BytesIO(data), max_bytes=limit)
    assert open_image(data, max_bytes=len(data)).size == (40, 40)
    assert MAX_UPLOAD_BYTES == 32 * 1024 * 1024
    too_big = b"\x89PNG" + bytes(2_000_000)
    with pytest.raises(ImageError, match=r"2\.0 MB is over the 1\.0 MB limit"):
        open_image(too_big, max_bytes=1_000_000)
    with pytest.raises(ImageError, match=r"more than 1\.0 MB is over the 1\.0 MB limit"):
        open_image(io.BytesIO(too_big), max_bytes=1_000_000)


def test_upload_stream_is_not_read_past_the_limit() -> None:
    class Endless(io.RawIOBase):
        read_sizes: list[int] = []

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            self.read_sizes.append(size)
            if size < 0:
                raise AssertionError("unbounded read of an upload")
            return b"\x00" * size

    stream = Endless()
    with pytest.raises(ImageError, match="over the"):
        open_image(stream, max_bytes=1000)  # type: ignore[arg-type]
    assert sum(stream.read_sizes) <= 1001


# --------------------------------------------------------------------------------------------
# normalisation


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (16, 12), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    img = open_image(data)
    assert img.mode == "RGB" and img.size == (16, 12)
    assert_close(img.getpixel((8, 6)), (255, 0, 0), tol=5)  # lossless palette: exact, +-5 for dithering


def test_animated_png_gives_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 0, 255), (255, 255, 0))]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    img = open_image(data)
    assert img.getpixel((4, 4)) == (0, 0, 255)


def test_16bit_png_scaled_to_8bit() -> None:
    values = np.array([[0, 257 * 128, 65535, 257 * 100]], dtype=np.uint16)
    img = open_image(encode(Image.fromarray(values), "PNG"))
    assert img.mode == "L"
    assert np.asarray(img).tolist() == [[0, 128, 255, 100]]
    # a flat 16-bit image keeps its level (no per-image contrast stretch)
    flat = open_image(encode(Image.fromarray(np.full((4, 4), 257 * 100, np.uint16)), "PNG"))
    assert np.asarray(flat).min() == np.asarray(flat).max() == 100


def test_palette_png_with_transparency() -> None:
    pal = Image.new("P", (4, 2), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    data = encode(pal, "PNG", transparency=0)
    img = open_image(data)
    assert img.mode == "RGBA"
    assert img.getpixel((0, 0)) == (255, 0, 0, 255)
    assert img.getpixel((1, 0)) == (0, 0, 0, 0)
    rgb = to_mode(img, "RGB", background=255)
    assert rgb.getpixel((1, 0)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (255, 0, 0)


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    img = open_image(data)
    assert img.mode == "RGB"
    assert_close(img.getpixel((8, 8)), (255, 0, 0))


def test_exif_orientation_is_applied() -> None:
    src = Image.new("RGB", (40, 20), (255, 0, 0))
    src.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img = open_image(encode(src, "JPEG", exif=exif.tobytes(), quality=95))
    assert img.size == (20, 40)
    assert_close(img.getpixel((10, 5)), (255, 0, 0))  # the left half is now on top
    assert_close(img.getpixel((10, 35)), (0, 0, 255))


def test_rgba_alpha_composited_by_to_mode() -> None:
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    white = to_mode(rgba, "RGB", background=255)
    assert white.mode == "RGB" and white.getpixel((0, 0)) == (255, 255, 255)
    black = to_mode(rgba, "RGB", background=0)
    assert black.getpixel((0, 0)) == (0, 0, 0) and black.getpixel((1, 0)) == (128, 0, 0)
    grey = to_mode(rgba, "L", background=255)
    assert grey.mode == "L" and grey.getpixel((0, 0)) == 255
    la = Image.new("LA", (1, 1), (0, 0))
    assert to_mode(la, "L", background=200).getpixel((0, 0)) == 200


def test_open_keeps_alpha_for_to_mode() -> None:
    img = open_image(encode(Image.new("RGBA", (3, 3), (0, 255, 0, 0)), "PNG"))
    assert img.mode == "RGBA"
    assert to_mode(img, "RGB", background=255).getpixel((1, 1)) == (255, 255, 255)


def test_tiny_image() -> None:
    img = open_image(encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"))
    assert img.size == (1, 1) and img.getpixel((0, 0)) == (1, 2, 3)
    assert thumbnail(img, 32).size == (32, 32)


def test_large_but_allowed_image() -> None:
    img = open_image(bilevel_png(4000, 3000))  # 12 MP
    assert img.size == (4000, 3000) and img.mode == "L"


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "PNG"),
        ("RGB", "BMP"),
        ("RGB", "WEBP"),
        ("RGB", "TIFF"),
        ("1", "PNG"),
        ("I", "TIFF"),
        ("F", "TIFF"),
    ],
)
def test_other_modes_become_8bit(mode: str, fmt: str) -> None:
    base = noise((8, 6), "L")
    src = base.convert(mode) if mode != "F" else Image.fromarray(np.asarray(base, np.float32) / 255.0, "F")
    img = open_image(encode(src, fmt))
    assert img.mode in ("L", "RGB") and img.size == (8, 6)
    if mode in ("I", "F"):  # 32-bit values stretched over 0..255
        assert np.asarray(img).min() == 0 and np.asarray(img).max() == 255


@pytest.mark.filterwarnings("error::RuntimeWarning")  # no "invalid value encountered in cast"
def test_float_image_with_nan_is_finite() -> None:
    arr = np.array([[0.0, np.nan], [0.5, 1.0]], dtype=np.float32)
    img = open_image(encode(Image.fromarray(arr, "F"), "TIFF"))
    assert img.mode == "L" and np.asarray(img).tolist() == [[0, 0], [128, 255]]


# --------------------------------------------------------------------------------------------
# thumbnails


def test_thumbnail_sizes_and_modes() -> None:
    small = noise((28, 28), "L")
    thumb = thumbnail(small, 64)
    assert thumb.size == (64, 64) and thumb.mode == "L"
    assert set(np.unique(np.asarray(thumb))) <= set(np.unique(np.asarray(small)))  # nearest: crisp
    wide = thumbnail(noise((400, 200)), 64)
    assert wide.size == (64, 32) and wide.mode == "RGB"
    assert thumbnail(Image.new("RGBA", (10, 20), (255, 0, 0, 0)), 10).getpixel((2, 2)) == (0, 0, 0)
    cmyk = thumbnail(Image.new("CMYK", (10, 10), (0, 255, 255, 0)), 5)
    assert cmyk.mode == "RGB" and cmyk.getpixel((2, 2)) == (255, 0, 0)  # colour kept


# --------------------------------------------------------------------------------------------
# arbitrary damage: only ImageError, never another exception


def _animation(fmt: str, mode: str = "RGB") -> bytes:
    frames = [noise((8, 6), seed=s).convert(mode) for s in range(3)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "APNG", "WEBP", "TIFF", "BMP"])
def test_every_truncation_raises_only_image_error(fmt: str) -> None:
    # PIL's pure-Python GIF parser raised IndexError / struct.error on a cut-off later frame
    data = {
        "GIF": lambda: _animation("GIF", "P"),
        "APNG": lambda: _animation("PNG"),
        "WEBP": lambda: _animation("WEBP"),
        "TIFF": lambda: _animation("TIFF"),
    }.get(fmt, lambda: encode(noise((8, 6)), fmt))()
    for cut in range(1, len(data)):
        try:
            img = open_image(data[:cut])
        except ImageError:
            continue
        assert img.mode in ("L", "LA", "RGB", "RGBA") and img.size == (8, 6)


def tiff_with_rational_strip_offset() -> bytes:
    """A 1x1 grey TIFF whose StripOffsets tag is a RATIONAL: PIL's decoder then raises
    TypeError (not OSError) in ``load``."""
    entries = [(256, 3, 1), (257, 3, 1), (258, 3, 8), (259, 3, 1), (262, 3, 1), (277, 3, 1), (278, 3, 1)]
    n = len(entries) + 2
    data_off = 8 + 2 + 12 * n + 4
    ifd = struct.pack("<H", n)
    for tag, typ, val in entries[:5]:
        ifd += struct.pack("<HHIHH", tag, typ, 1, val, 0)
    ifd += struct.pack("<HHII", 273, 5, 1, data_off)  # StripOffsets as a RATIONAL
    for tag, typ, val in entries[5:]:
        ifd += struct.pack("<HHIHH", tag, typ, 1, val, 0)
    ifd += struct.pack("<HHII", 279, 4, 1, 1) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<II", 3 * (data_off + 8), 2) + b"\x80"


def test_decoder_errors_of_any_type_become_image_error() -> None:
    data = tiff_with_rational_strip_offset()
    with pytest.raises(TypeError):
        Image.open(io.BytesIO(data)).load()
    with pytest.raises(ImageError, match="truncated or corrupt"):
        open_image(data)


def test_animation_with_damaged_later_frame_gives_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    img = open_image(data[: len(data) - 20])  # the second frame cut short: is_animated would crash
    assert img.getpixel((4, 4)) == (255, 0, 0)


_SAMPLES = [
    encode(noise((16, 12)), "PNG"),
    encode(noise((16, 12)), "JPEG"),
    encode(noise((16, 12)).convert("P"), "GIF"),
    encode(noise((16, 12)), "BMP"),
    encode(noise((16, 12)), "TIFF"),
    encode(noise((16, 12)), "WEBP"),
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's TIFF parser warns about broken tags
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sample=st.sampled_from(_SAMPLES),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    cut=st.integers(1, 10_000),
)
def test_damaged_files_raise_only_image_error(sample: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(sample[: max(1, min(cut, len(sample)))])
    for pos, value in edits:
        data[pos % len(data)] = value
    try:
        img = open_image(bytes(data))
    except ImageError:
        return
    assert img.mode in ("L", "LA", "RGB", "RGBA")
    assert img.size[0] >= 1 and img.size[1] >= 1
