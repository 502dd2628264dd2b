"""Image validation and normalisation for ingest.

Every image that enters samples/ has been fully decoded once (so truncated files are caught here, not in the
middle of training), has its EXIF orientation applied, is RGB, is no larger than the configured side, and is stored
as JPEG, PNG or WebP. The original bytes are kept unchanged whenever none of that required a change.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from grain.data.files import exif_orientation, orient, to_rgb

#: Formats stored as they are when no change is needed; everything else is re-encoded.
PASSTHROUGH_FORMATS = {"JPEG", "PNG", "WEBP"}
#: Lossy sources are re-encoded as JPEG; lossless ones (PNG, GIF, BMP, TIFF, 16-bit…) as PNG.
LOSSY_FORMATS = {"JPEG", "WEBP", "MPO"}


class ImageRejected(Exception):
    """The bytes cannot become a sample image. ``reason`` is a quarantine code (grain.contracts)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class NormalisedImage:
    data: bytes
    width: int
    height: int
    format: str  # JPEG | PNG | WEBP
    changes: list[str] = field(default_factory=list)  # what was done, e.g. ["exif_orientation:6", "mode:CMYK->RGB"]


def normalise_image(
    raw: bytes | None,
    *,
    max_side: int | None = 1024,
    min_side: int = 8,
    max_pixels: int = 89_478_485,
    jpeg_quality: int = 95,
) -> NormalisedImage:
    """Validate ``raw`` and return RGB image bytes; raise ImageRejected with a quarantine reason otherwise.

    Checks in order: empty → ``empty_file``; unidentifiable → ``not_an_image``; ``width*height > max_pixels``
    → ``too_large`` (decided from the header, nothing is decoded); shorter side < ``min_side`` → ``too_small``;
    full decode failure (truncated/corrupt) → ``decode_error``. Then EXIF orientation is applied, the mode is
    converted to RGB (alpha composited on white, 16-bit scaled to 8-bit, CMYK through its ICC profile when it
    has one), and the image is downscaled so its longer side is at most ``max_side``.
    """
    if not raw:
        raise ImageRejected("empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            # Pillow warns above Image.MAX_IMAGE_PIXELS; our own limit (max_pixels) is checked below instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as exc:  # Pillow's hard limit (2 x MAX_IMAGE_PIXELS) also applies
        raise ImageRejected("too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", f"{len(raw)} bytes in no format Pillow identifies (starts {raw[:8]!r})") from None
    except Exception as exc:  # noqa: BLE001 - a recognised format whose header is cut short or corrupt
        raise ImageRejected("decode_error", f"header unreadable: {type(exc).__name__}: {exc}") from None

    width, height = img.size
    source_format = img.format or "UNKNOWN"
    if width * height > max_pixels:
        raise ImageRejected("too_large", f"{width}x{height} = {width * height} pixels > ingest.max_pixels={max_pixels}")
    if min(width, height) < min_side:
        raise ImageRejected("too_small", f"{width}x{height}: shorter side < ingest.min_side={min_side}")
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001 - truncation shows up as OSError, SyntaxError, zlib/struct errors…
        raise ImageRejected("decode_error", f"{source_format} {width}x{height}: {type(exc).__name__}: {exc}") from None

    changes: list[str] = []
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        changes.append(f"first_frame_of:{frames}")
    orientation = exif_orientation(img)
    if orientation != 1:
        img = orient(img)
        changes.append(f"exif_orientation:{orientation}")
    if img.mode != "RGB":
        changes.append(f"mode:{img.mode}->RGB")
        img = to_rgb(img)
    if max_side is not None and max(img.size) > max_side:
        before = img.size
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        changes.append(f"resized:{before[0]}x{before[1]}->{img.size[0]}x{img.size[1]}")

    if not changes and source_format in PASSTHROUGH_FORMATS:
        return NormalisedImage(raw, img.size[0], img.size[1], source_format, changes)
    out_format = "JPEG" if source_format in LOSSY_FORMATS else "PNG"
    buf = io.BytesIO()
    if out_format == "JPEG":
        img.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        img.save(buf, format="PNG", optimize=False)
    changes.append(f"reencoded:{source_format}->{out_format}")
    return NormalisedImage(buf.getvalue(), img.size[0], img.size[1], out_format, changes)
