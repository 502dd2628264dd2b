"""A corpus of good, awkward and broken images, generated on the fly (nothing is committed).

Each case says what ingest must do with it: keep it (``expect=None``, possibly after normalisation) or quarantine
it with the given reason.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from conftest import encode, gradient_image


@dataclass
class Case:
    name: str
    data: bytes | None
    expect: str | None  # quarantine reason, or None = kept
    size: tuple[int, int] | None = None  # expected (width, height) when kept
    caption: str | None = "a test image"


def _png_with_header_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR claims ``width`` x ``height`` (CRC fixed up), for bomb tests."""
    raw = encode(Image.new("RGB", (4, 4), (10, 20, 30)), "PNG")
    ihdr_at = raw.index(b"IHDR")
    body = bytearray(raw[ihdr_at : ihdr_at + 4 + 13])
    body[4:8] = struct.pack(">I", width)
    body[8:12] = struct.pack(">I", height)
    crc = struct.pack(">I", zlib.crc32(bytes(body)) & 0xFFFFFFFF)
    return raw[:ihdr_at] + bytes(body) + crc + raw[ihdr_at + 17 + 4 :]


def _exif_rotated_jpeg() -> bytes:
    img = gradient_image(40, 20, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def _sixteen_bit_png() -> bytes:
    arr = np.zeros((16, 24), dtype=np.uint16)
    arr[:, :8] = 65535
    arr[:, 8:16] = 32896  # 128 * 257
    return encode(Image.fromarray(arr), "PNG")


def _palette_png_with_transparency() -> bytes:
    img = Image.new("P", (20, 20), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    for x in range(10):
        for y in range(20):
            img.putpixel((x, y), 1)
    return encode(img, "PNG", transparency=0)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (12, 12), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def build_cases() -> list[Case]:
    good_jpeg = encode(gradient_image(64, 48, seed=1), "JPEG", quality=90)
    good_png = encode(gradient_image(30, 50, seed=2), "PNG")
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    return [
        Case("good_jpeg", good_jpeg, None, (64, 48)),
        Case("good_png", good_png, None, (30, 50)),
        Case("good_webp", encode(gradient_image(20, 20, seed=5), "WEBP", quality=90), None, (20, 20)),
        Case("exif_rotated", _exif_rotated_jpeg(), None, (20, 40)),
        Case("cmyk_jpeg", encode(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG"), None, (24, 24)),
        Case("palette_transparent", _palette_png_with_transparency(), None, (20, 20)),
        Case("sixteen_bit", _sixteen_bit_png(), None, (24, 16)),
        Case("rgba_transparent", encode(rgba, "PNG"), None, (16, 16)),
        Case("grayscale", encode(Image.new("L", (18, 18), 77), "PNG"), None, (18, 18)),
        Case("bmp", encode(gradient_image(22, 22, seed=6), "BMP"), None, (22, 22)),
        Case("animated_gif", _animated_gif(), None, (12, 12)),
        Case("oversized_side", encode(gradient_image(2400, 60, seed=7), "PNG"), None, (1024, 26)),
        Case("truncated_jpeg", good_jpeg[: len(good_jpeg) // 2], "decode_error"),
        Case("truncated_png", good_png[: len(good_png) - 40], "decode_error"),
        Case("zero_byte", b"", "empty_file"),
        Case("not_an_image", b"<html>404 Not Found</html>" * 4, "not_an_image"),
        Case("huge_dimensions", _png_with_header_size(100_000, 100_000), "too_large"),
        Case("bomb_below_pillow_limit", _png_with_header_size(12_000, 9_000), "too_large"),
        Case("too_small", encode(Image.new("RGB", (3, 50), (1, 2, 3)), "PNG"), "too_small"),
        Case("no_caption", good_jpeg, "missing_caption", caption="   "),
        Case("null_caption", good_png, "missing_caption", caption=None),
    ]
