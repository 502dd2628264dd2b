"""The one I/O layer under ingest and evaluate: how grain reads input files and turns image bytes into RGB.

Everything that reads data a user brings goes through here, so an image, a tar or a CSV means the same thing to
every stage:

* :func:`to_rgb` / :func:`decode_rgb`: image bytes → RGB with one rule for alpha (composited on white), palette
  transparency, 16-bit and 32-bit integer greys (scaled, not clipped), CMYK (through its ICC profile when it has
  one) and EXIF orientation. Ingest stores images converted by this rule; the training loader and every eval
  adapter decode with it, so an image is prepared the same way whichever path it takes.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB without the usual traps (black alpha, clipped 16-bit, naive CMYK)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 0..65535 → 0..255
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "CMYK":
        icc = img.info.get("icc_profile")
        if icc:
            try:
                from PIL import ImageCms

                src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            except Exception:  # noqa: BLE001 - a broken profile falls back to Pillow's plain conversion
                pass
        return img.convert("RGB")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_rgb(data: bytes, *, where: str = "image") -> Image.Image:
    """Decode encoded image bytes to RGB (EXIF orientation applied, then :func:`to_rgb`).

    Raises ValueError naming ``where`` (a file, key or uid) when the bytes do not decode.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
        if img.getexif().get(0x0112, 1) not in (1, None):
            img = ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001 - any decoder failure becomes one error naming the item
        raise ValueError(f"{where}: cannot decode image ({len(data)} bytes): {type(exc).__name__}: {exc}") from None
    return to_rgb(img)
