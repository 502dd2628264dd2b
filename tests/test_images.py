"""Image validation/normalisation on the generated corpus of good, awkward and broken images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from grain.data.images import ImageRejected, normalise_image
from image_corpus import build_cases

IMAGE_CASES = [c for c in build_cases() if c.expect != "missing_caption"]


@pytest.mark.parametrize("case", IMAGE_CASES, ids=lambda c: c.name)
def test_each_case_is_kept_or_rejected_with_its_reason(case):
    if case.expect is None:
        out = normalise_image(case.data)
        img = Image.open(io.BytesIO(out.data))
        img.load()
        assert img.mode == "RGB"
        assert (out.width, out.height) == img.size == case.size
        assert out.format in ("JPEG", "PNG", "WEBP") and img.format == out.format
    else:
        with pytest.raises(ImageRejected) as info:
            normalise_image(case.data)
        assert info.value.reason == case.expect
        assert info.value.detail  # a sentence for people, never empty


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_clean_images_are_passed_through_byte_for_byte():
    case = next(c for c in IMAGE_CASES if c.name == "good_jpeg")
    out = normalise_image(case.data)
    assert out.data == case.data and out.changes == []


def test_exif_orientation_is_applied_not_just_dropped():
    case = next(c for c in IMAGE_CASES if c.name == "exif_rotated")
    out = normalise_image(case.data)
    assert "exif_orientation:6" in out.changes
    arr = _decoded(out.data)
    original = _decoded(case.data)  # 40 wide x 20 high, red grows to the right
    # Orientation 6 means the stored image must be rotated 90° clockwise: the original left column becomes the top row.
    assert arr.shape[:2] == (40, 20)
    assert abs(arr[0, :, 0].mean() - original[:, 0, 0].mean()) < 12
    assert abs(arr[-1, :, 0].mean() - original[:, -1, 0].mean()) < 12
    # The rewritten file must not carry the orientation tag again (it would be rotated twice).
    assert Image.open(io.BytesIO(out.data)).getexif().get(0x0112, 1) == 1


def test_sixteen_bit_is_scaled_not_clipped():
    case = next(c for c in IMAGE_CASES if c.name == "sixteen_bit")
    arr = _decoded(normalise_image(case.data).data)
    assert arr[:, :8].min() == 255
    assert abs(int(arr[:, 8:16].mean()) - 128) <= 1  # a naive convert() would clip 32896 to 255
    assert arr[:, 16:].max() == 0


def test_transparency_is_composited_on_white():
    arr = _decoded(normalise_image(next(c for c in IMAGE_CASES if c.name == "rgba_transparent").data).data)
    assert arr.min() == 255  # fully transparent red → white, not black or red
    pal = _decoded(normalise_image(next(c for c in IMAGE_CASES if c.name == "palette_transparent").data).data)
    assert (pal[:, 10:] == 255).all()  # transparent palette index → white
    assert (pal[:, :10, 2] == 255).all() and (pal[:, :10, 0] == 0).all()  # opaque blue stays blue


def test_cmyk_becomes_rgb_with_the_right_hue():
    arr = _decoded(normalise_image(next(c for c in IMAGE_CASES if c.name == "cmyk_jpeg").data).data)
    r, g, b = arr.reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60  # C=0, M=Y=255 is red


def test_limits_come_from_config():
    data = next(c for c in IMAGE_CASES if c.name == "good_png").data  # 30x50
    with pytest.raises(ImageRejected) as info:
        normalise_image(data, max_pixels=30 * 50 - 1)
    assert info.value.reason == "too_large"
    with pytest.raises(ImageRejected) as info:
        normalise_image(data, min_side=31)
    assert info.value.reason == "too_small"
    out = normalise_image(data, max_side=25)
    assert max(out.width, out.height) == 25 and any(c.startswith("resized") for c in out.changes)
    assert normalise_image(data, max_side=None).data == data


def test_animated_images_keep_their_first_frame_and_say_so():
    out = normalise_image(next(c for c in IMAGE_CASES if c.name == "animated_gif").data)
    assert "first_frame_of:3" in out.changes
    arr = _decoded(out.data)
    assert arr[..., 0].min() > 200 and arr[..., 1].max() < 60  # the red first frame, not green or blue
