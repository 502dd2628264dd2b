"""Box conversions and the OWLv2 padded-square frame (grain.annotate.boxes).

Sizes used throughout: a square, a portrait (60 x 140) and a landscape (200 x 70) image, given as
(width, height). The processor-level checks (painted rectangle through ``Owlv2ImageProcessor``, the
transformers post-processing) live in ``tests/test_tiny_owl.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grain.annotate.boxes import (
    OWL_FRAMES,
    box_area,
    clip_unit,
    cxcywh_to_xyxy,
    denormalise_xyxy,
    normalise_xyxy,
    original_to_owl,
    owl_square_side,
    owl_to_original,
    xyxy_to_cxcywh,
)

SIZES = [(100, 100), (60, 140), (200, 70)]  # (width, height): square, portrait, landscape


def random_unit_boxes(rng: np.random.Generator, n: int = 50) -> np.ndarray:
    """``[n, 4]`` valid normalised xyxy boxes (x0 <= x1, y0 <= y1, inside [0, 1])."""
    a, b = rng.random((n, 2)), rng.random((n, 2))
    return np.concatenate([np.minimum(a, b), np.maximum(a, b)], axis=1)


def naive_hw_normalised(unit_cxcywh, width: int, height: int) -> np.ndarray:
    """What the naive ``target_sizes=(height, width)`` stretch (OWL-ViT / old OWLv2 post-processing) yields.

    It scales the unit-square corners by ``(width, height, width, height)``; normalising those pixels by the
    image size gives back the unit-square corners themselves, i.e. it pretends the unit square IS the image.
    """
    px = np.asarray(cxcywh_to_xyxy(unit_cxcywh)) * np.array([width, height, width, height], dtype=np.float64)
    return np.asarray(normalise_xyxy(px, width, height))


# ------------------------------------------------------------------------------------------------ round trips


def test_xyxy_cxcywh_round_trip(rng):
    boxes = random_unit_boxes(rng) * 300.0
    np.testing.assert_allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(boxes)), boxes, atol=1e-9)
    c = xyxy_to_cxcywh(boxes)
    np.testing.assert_allclose(xyxy_to_cxcywh(cxcywh_to_xyxy(c)), c, atol=1e-9)
    # by hand
    np.testing.assert_allclose(xyxy_to_cxcywh([[10, 20, 30, 60]]), [[20, 40, 20, 40]])
    np.testing.assert_allclose(cxcywh_to_xyxy([[0.5, 0.5, 0.2, 0.4]]), [[0.4, 0.3, 0.6, 0.7]])


@pytest.mark.parametrize("size", SIZES)
def test_normalise_round_trip(rng, size):
    w, h = size
    boxes = random_unit_boxes(rng)
    px = denormalise_xyxy(boxes, w, h)
    assert px[:, [0, 2]].max() <= w and px[:, [1, 3]].max() <= h
    np.testing.assert_allclose(normalise_xyxy(px, w, h), boxes, atol=1e-12)
    np.testing.assert_allclose(normalise_xyxy([[0, 0, w, h]], w, h), [[0, 0, 1, 1]])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("frame", OWL_FRAMES)
def test_original_owl_original_round_trip(rng, size, frame):
    w, h = size
    boxes = random_unit_boxes(rng)
    owl = original_to_owl(boxes, w, h, frame)
    np.testing.assert_allclose(owl_to_original(owl, w, h, frame), boxes, atol=1e-12)
    # and back through torch, keeping the tensor type
    t = owl_to_original(torch.as_tensor(owl, dtype=torch.float64), w, h, frame)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    np.testing.assert_allclose(t.numpy(), boxes, atol=1e-12)


@pytest.mark.parametrize("size", SIZES)
def test_owl_boxes_stay_inside_image_part_of_square(rng, size):
    """Boxes inside the image only use the top-left [0, w/S] x [0, h/S] part of the unit square."""
    w, h = size
    s = owl_square_side(w, h)
    xyxy = original_to_owl(random_unit_boxes(rng), w, h, "unit_square_xyxy")
    assert xyxy[:, [0, 2]].max() <= w / s + 1e-12 and xyxy[:, [1, 3]].max() <= h / s + 1e-12
    np.testing.assert_allclose(original_to_owl([[0, 0, 1, 1]], w, h, "unit_square_xyxy"), [[0, 0, w / s, h / s]])


# ------------------------------------------------------------------------------------------------ by hand


def test_square_side():
    assert owl_square_side(200, 100) == 200
    assert owl_square_side(60, 140) == 140
    assert owl_square_side(64, 64) == 64
    with pytest.raises(ValueError):
        owl_square_side(0, 10)


def test_hand_computed_landscape_right_half():
    # 200 x 100 image, padded to 200 x 200 (padding = the bottom half of the square)
    w, h = 200, 100
    np.testing.assert_allclose(owl_to_original([[100, 0, 200, 100]], w, h, "padded_pixels"), [[0.5, 0, 1, 1]])
    # the same box as raw model output: centre (150, 50) / 200, size (100, 100) / 200
    np.testing.assert_allclose(owl_to_original([[0.75, 0.25, 0.5, 0.5]], w, h, "unit_square"), [[0.5, 0, 1, 1]])
    np.testing.assert_allclose(owl_to_original([[0.5, 0, 1, 0.5]], w, h, "unit_square_xyxy"), [[0.5, 0, 1, 1]])
    np.testing.assert_allclose(original_to_owl([[0.5, 0, 1, 1]], w, h, "padded_pixels"), [[100, 0, 200, 100]])
    np.testing.assert_allclose(original_to_owl([[0.5, 0, 1, 1]], w, h, "unit_square"), [[0.75, 0.25, 0.5, 0.5]])


def test_hand_computed_portrait_bottom_half():
    # 100 x 200 image, padded to 200 x 200 (padding = the right half of the square)
    w, h = 100, 200
    np.testing.assert_allclose(owl_to_original([[0, 100, 100, 200]], w, h, "padded_pixels"), [[0, 0.5, 1, 1]])
    np.testing.assert_allclose(owl_to_original([[0.25, 0.75, 0.5, 0.5]], w, h, "unit_square"), [[0, 0.5, 1, 1]])


def test_hand_computed_small_box_landscape():
    # 200 x 70: a box at pixels [120, 20, 180, 60] is unit [0.6, 0.1, 0.9, 0.3] of the 200-px square
    w, h = 200, 70
    unit = np.array([[0.75, 0.2, 0.3, 0.2]])  # cxcywh of [0.6, 0.1, 0.9, 0.3]
    np.testing.assert_allclose(owl_to_original(unit, w, h, "unit_square"), [[0.6, 20 / 70, 0.9, 60 / 70]])


# ------------------------------------------------------------------------------------------------ clipping


def test_boxes_reaching_into_padding_are_clipped():
    w, h = 200, 100  # square 200; rows 100..200 are padding
    out = owl_to_original([[150, 50, 250, 180], [10, 120, 50, 190]], w, h, "padded_pixels")
    # first box: cut at the right (x > 200 is outside the square) and at the bottom (y > 100 is padding)
    np.testing.assert_allclose(out[0], [0.75, 0.5, 1.0, 1.0])
    # second box lies wholly in the padding: it collapses onto the bottom border, area 0
    np.testing.assert_allclose(out[1], [0.05, 1.0, 0.25, 1.0])
    np.testing.assert_allclose(box_area(out), [0.25 * 0.5, 0.0])
    raw = owl_to_original([[150, 50, 250, 180]], w, h, "padded_pixels", clip=False)
    np.testing.assert_allclose(raw, [[0.75, 0.5, 1.25, 1.8]])


def test_clip_unit_orders_and_clips():
    out = clip_unit([[0.8, 0.9, 0.2, 0.1], [-0.5, 0.2, 1.5, 0.4], [1.2, 1.3, 1.5, 1.6]])
    np.testing.assert_allclose(out, [[0.2, 0.1, 0.8, 0.9], [0.0, 0.2, 1.0, 0.4], [1.0, 1.0, 1.0, 1.0]])
    t = clip_unit(torch.tensor([[0.8, -0.1, 0.2, 0.5]]))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    torch.testing.assert_close(t, torch.tensor([[0.2, 0.0, 0.8, 0.5]]))


# ------------------------------------------------------------------------------------------------ naive call


@pytest.mark.parametrize("size", [(60, 140), (200, 70)])
def test_naive_hw_target_sizes_differ_on_non_square(rng, size):
    """Stretching the unit square over (w, h) is wrong on non-square images; the padded frame is right."""
    w, h = size
    s = owl_square_side(w, h)
    truth = random_unit_boxes(rng)
    unit = original_to_owl(truth, w, h, "unit_square")
    right = owl_to_original(unit, w, h, "unit_square")
    wrong = naive_hw_normalised(unit, w, h)
    np.testing.assert_allclose(right, truth, atol=1e-12)
    # the long axis agrees, the short axis is shrunk by short / S towards the top/left edge
    long_axis, short_axis = ([0, 2], [1, 3]) if w > h else ([1, 3], [0, 2])
    np.testing.assert_allclose(wrong[:, long_axis], truth[:, long_axis], atol=1e-12)
    np.testing.assert_allclose(wrong[:, short_axis], truth[:, short_axis] * min(w, h) / s, atol=1e-12)
    assert np.abs(wrong - truth).max() > 0.2


def test_naive_equals_padded_frame_on_square(rng):
    unit = original_to_owl(random_unit_boxes(rng), 100, 100, "unit_square")
    np.testing.assert_allclose(naive_hw_normalised(unit, 100, 100), owl_to_original(unit, 100, 100, "unit_square"))


# ------------------------------------------------------------------------------------------------ types, shapes


def test_types_and_shapes():
    single = owl_to_original([100, 0, 200, 100], 200, 100)
    assert isinstance(single, np.ndarray) and single.shape == (4,) and single.dtype == np.float64
    batch = np.zeros((2, 3, 4))
    assert cxcywh_to_xyxy(batch).shape == (2, 3, 4)
    assert xyxy_to_cxcywh(np.zeros((0, 4))).shape == (0, 4)
    t = xyxy_to_cxcywh(torch.tensor([[0, 0, 10, 20]]))  # integer tensor -> float32
    assert t.dtype == torch.float32
    torch.testing.assert_close(t, torch.tensor([[5.0, 10.0, 10.0, 20.0]]))
    half = torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=torch.float16)
    assert cxcywh_to_xyxy(half).dtype == torch.float16
    src = np.array([[0.8, 0.9, 0.2, 0.1]])
    clip_unit(src)
    np.testing.assert_array_equal(src, [[0.8, 0.9, 0.2, 0.1]])  # inputs are not modified


def test_format_converters_are_torchvision_box_convert():
    """The two converters wrap ``torchvision.ops.box_convert`` (the one implementation the trainer's losses and
    matcher use too): same numbers, numpy views of any stride, tensors keep device and autograd."""
    from torchvision.ops import box_convert

    boxes = random_unit_boxes(np.random.default_rng(3), 20)
    np.testing.assert_array_equal(xyxy_to_cxcywh(boxes), box_convert(torch.from_numpy(boxes), "xyxy", "cxcywh").numpy())
    c = xyxy_to_cxcywh(boxes)
    np.testing.assert_array_equal(cxcywh_to_xyxy(c), box_convert(torch.from_numpy(c), "cxcywh", "xyxy").numpy())
    np.testing.assert_array_equal(cxcywh_to_xyxy(c[::-1]), cxcywh_to_xyxy(c)[::-1])  # negative strides are fine
    assert cxcywh_to_xyxy(np.float32(c)).dtype == np.float64  # numpy in -> float64 out, as documented
    t = torch.tensor(c, dtype=torch.float32, requires_grad=True)
    cxcywh_to_xyxy(t).sum().backward()
    assert t.grad is not None and t.grad.shape == t.shape


def test_errors():
    with pytest.raises(ValueError):
        cxcywh_to_xyxy([[1, 2, 3]])
    with pytest.raises(ValueError):
        owl_to_original([[0, 0, 1, 1]], 10, 10, frame="model_pixels")
    with pytest.raises(ValueError):
        normalise_xyxy([[0, 0, 1, 1]], 0, 10)
