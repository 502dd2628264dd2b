"""Box coordinate conversions, including the OWLv2 padded-square frame.

Project convention (everywhere on disk): a box is ``[x0, y0, x1, y1]`` (float), normalised to ``[0, 1]`` of
the ORIGINAL image, ``x`` to the right over the width and ``y`` down over the height, with ``x0 <= x1`` and
``y0 <= y1``. Every function here takes an array-like whose last axis has length 4 (shape ``[N, 4]``, a single
box ``[4]``, or any ``[..., 4]``) and returns the same kind of object: a ``torch.Tensor`` for a tensor input
(floating dtype and device kept; integer tensors become float32), otherwise a ``numpy`` float64 array. The
functions are pure: inputs are never modified.

Frames
------
``xyxy``   corners ``[x0, y0, x1, y1]``; ``cxcywh`` centre and size ``[cx, cy, w, h]``; both in any unit.

The OWLv2 frame
---------------
``Owlv2ImageProcessor`` (both its torchvision and its PIL backend) does not squash an image of ``width`` x
``height`` pixels to the model size. It first pads the image with zeros (black) at the BOTTOM and RIGHT to a
square of side ``S = max(width, height)``, the image staying in the top-left corner, and then resizes that
square to the model size (960 for the real checkpoints, 128 for the tiny model). The model therefore predicts
boxes relative to the padded square:

* ``"unit_square"`` -- raw ``outputs.pred_boxes``: ``[cx, cy, w, h]`` normalised to the padded square, so
  ``(0, 0)`` is the image's top-left corner and ``(1, 1)`` is the square's bottom-right corner, which lies in
  the padding for a non-square image;
* ``"unit_square_xyxy"`` -- the same boxes as corners, i.e. what ``post_process_object_detection`` /
  ``post_process_grounded_object_detection`` return with ``target_sizes=None``;
* ``"padded_pixels"`` -- ``[x0, y0, x1, y1]`` in pixels of the padded square (side ``S``), i.e. what the
  post-processing returns with ``target_sizes=[(S, S)]``. Because the image sits at the top-left of the
  square, a pixel of the padded square IS a pixel of the original image; coordinates ``> width`` (or
  ``> height``) lie in the padding.

Mapping back to the project convention is a scale per axis, ``x / width`` and ``y / height`` of the padded
pixels (equivalently ``u * S / width`` and ``v * S / height`` of the unit square), followed by clipping: a box
that reaches into the padding is cut at the image border, and a box lying entirely in the padding becomes
degenerate (zero width or height; see :func:`box_area`).

Why the naive ``target_sizes=(height, width)`` is a trap
--------------------------------------------------------
The OWL-ViT (v1) post-processing, and OWLv2's in older ``transformers`` releases, scale the unit-square
boxes by ``(width, height, width, height)``: ``x = u * width``, ``y = v * height``. That is only right when the
model saw the image squashed to a square. For OWLv2 the unit refers to the padded side ``S`` on BOTH axes, so
on the short axis the naive call multiplies by the short side instead of ``S``: every coordinate on that axis
is shrunk by ``short / S``. For a 200 x 70 landscape image a box whose true vertical extent is pixels
``[20, 60]`` (unit ``[0.1, 0.3]``) comes back as ``[7, 21]`` -- squeezed and shifted towards the top edge --
while the horizontal coordinates happen to be right; a portrait image is squeezed towards the left edge.
Passing ``target_sizes=[(S, S)]`` scales both axes by ``S`` and is correct in every release. (In
``transformers`` 5.24 the Owlv2 post-processing itself scales both axes by ``max(height, width)``, so there
``(height, width)`` and ``(S, S)`` agree; ``(S, S)`` is the call that does not depend on that detail.)
Neither call clips to the image: use :func:`owl_to_original`, which also normalises to the original image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:  # torch (and torchvision, for the two format converters) is optional for the other pure-numpy functions
    import torch
except ImportError:  # pragma: no cover - torch is installed in the project venv
    torch = None  # type: ignore[assignment]

__all__ = [
    "OWL_FRAMES",
    "cxcywh_to_xyxy",
    "xyxy_to_cxcywh",
    "normalise_xyxy",
    "denormalise_xyxy",
    "clip_unit",
    "box_area",
    "owl_square_side",
    "owl_to_original",
    "original_to_owl",
]

#: Frames understood by :func:`owl_to_original` / :func:`original_to_owl` (see the module docstring).
OWL_FRAMES: tuple[str, ...] = ("padded_pixels", "unit_square", "unit_square_xyxy")


# ------------------------------------------------------------------------------------------------ helpers


def _is_tensor(x: Any) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def _as_boxes(boxes: Any):
    """Return ``boxes`` as a float tensor (if it is a tensor) or a float64 numpy array; check the last axis."""
    if _is_tensor(boxes):
        arr = boxes if boxes.is_floating_point() else boxes.to(torch.float32)
    else:
        arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [..., 4], got {tuple(arr.shape)}")
    return arr


def _unbind(arr):
    return arr[..., 0], arr[..., 1], arr[..., 2], arr[..., 3]


def _stack(parts, like):
    if _is_tensor(like):
        return torch.stack(list(parts), dim=-1)
    return np.stack(list(parts), axis=-1)


def _minimum(a, b, like):
    return torch.minimum(a, b) if _is_tensor(like) else np.minimum(a, b)


def _maximum(a, b, like):
    return torch.maximum(a, b) if _is_tensor(like) else np.maximum(a, b)


def _clip01(a, like):
    return a.clamp(0.0, 1.0) if _is_tensor(like) else np.clip(a, 0.0, 1.0)


def _check_size(width: float, height: float) -> None:
    if not (width > 0 and height > 0):
        raise ValueError(f"image size must be positive, got width={width}, height={height}")


# ------------------------------------------------------------------------------------------------ generic


def _box_convert(boxes, in_fmt: str, out_fmt: str):
    """``torchvision.ops.box_convert`` under this module's contract (the project's one box-format converter).

    The shape check and dtype rule are :func:`_as_boxes`'; a numpy input goes through a float64 tensor on the CPU
    and comes back as a new float64 array, a tensor input comes back as a tensor on its device (autograd kept).
    torchvision converts any ``[..., 4]`` (it unbinds and stacks the last axis). Imported on first use, so the
    module's pure-numpy functions do not pay for importing torchvision.
    """
    from torchvision.ops import box_convert

    b = _as_boxes(boxes)
    if _is_tensor(b):
        return box_convert(b, in_fmt, out_fmt)
    # a fresh C-ordered copy: torch cannot wrap a numpy view with negative strides (e.g. ``boxes[::-1]``)
    return box_convert(torch.from_numpy(np.array(b, order="C")), in_fmt, out_fmt).numpy()


def cxcywh_to_xyxy(boxes):
    """Centre/size ``[..., 4]`` = ``[cx, cy, w, h]`` -> corners ``[x0, y0, x1, y1]``, same unit and frame."""
    return _box_convert(boxes, "cxcywh", "xyxy")


def xyxy_to_cxcywh(boxes):
    """Corners ``[..., 4]`` = ``[x0, y0, x1, y1]`` -> centre/size ``[cx, cy, w, h]``, same unit and frame."""
    return _box_convert(boxes, "xyxy", "cxcywh")


def normalise_xyxy(boxes_px, width: float, height: float):
    """Pixel corners ``[..., 4]`` of a ``width`` x ``height`` image -> corners normalised to ``[0, 1]``.

    ``x`` is divided by ``width`` and ``y`` by ``height``; nothing is clipped (see :func:`clip_unit`).
    """
    _check_size(width, height)
    b = _as_boxes(boxes_px)
    x0, y0, x1, y1 = _unbind(b)
    return _stack((x0 / width, y0 / height, x1 / width, y1 / height), b)


def denormalise_xyxy(boxes, width: float, height: float):
    """Normalised corners ``[..., 4]`` -> pixel corners of a ``width`` x ``height`` image (float, unrounded)."""
    _check_size(width, height)
    b = _as_boxes(boxes)
    x0, y0, x1, y1 = _unbind(b)
    return _stack((x0 * width, y0 * height, x1 * width, y1 * height), b)


def clip_unit(boxes):
    """Make normalised corners ``[..., 4]`` valid: order each axis (``x0 <= x1``, ``y0 <= y1``), clip to [0, 1].

    A box outside the unit square on some axis collapses to zero extent at the nearest border (area 0).
    """
    b = _as_boxes(boxes)
    x0, y0, x1, y1 = _unbind(b)
    lo_x, hi_x = _minimum(x0, x1, b), _maximum(x0, x1, b)
    lo_y, hi_y = _minimum(y0, y1, b), _maximum(y0, y1, b)
    return _stack((_clip01(lo_x, b), _clip01(lo_y, b), _clip01(hi_x, b), _clip01(hi_y, b)), b)


def box_area(boxes):
    """Area of corners ``[..., 4]`` -> ``[...]``, in the boxes' unit squared; negative extents count as 0."""
    b = _as_boxes(boxes)
    x0, y0, x1, y1 = _unbind(b)
    w, h = x1 - x0, y1 - y0
    if _is_tensor(b):
        return w.clamp(min=0.0) * h.clamp(min=0.0)
    return np.maximum(w, 0.0) * np.maximum(h, 0.0)


# ------------------------------------------------------------------------------------------------ OWLv2


def owl_square_side(width: int, height: int) -> int:
    """Side ``S`` (pixels) of the square ``Owlv2ImageProcessor`` pads a ``width`` x ``height`` image to."""
    _check_size(width, height)
    return max(width, height)


def _check_frame(frame: str) -> None:
    if frame not in OWL_FRAMES:
        raise ValueError(f"unknown OWLv2 frame {frame!r}; expected one of {OWL_FRAMES}")


def owl_to_original(boxes, width: int, height: int, frame: str = "padded_pixels", clip: bool = True):
    """Map OWLv2 boxes ``[..., 4]`` to the project convention for an image of ``width`` x ``height`` pixels.

    Args:
        boxes: boxes in ``frame`` (see the module docstring): ``"padded_pixels"`` = ``[x0, y0, x1, y1]`` pixels of
            the padded square of side ``S = max(width, height)`` (post-processing with ``target_sizes=[(S, S)]``);
            ``"unit_square"`` = ``[cx, cy, w, h]`` in ``[0, 1]`` of the padded square (``outputs.pred_boxes``);
            ``"unit_square_xyxy"`` = ``[x0, y0, x1, y1]`` in ``[0, 1]`` of the padded square (post-processing
            with ``target_sizes=None``).
        width, height: size in pixels of the ORIGINAL image, exactly as it was given to the processor.
        frame: one of :data:`OWL_FRAMES`.
        clip: clip to the image with :func:`clip_unit` (default). Boxes reaching into the padding are cut at the
            image border; boxes wholly in the padding end with zero area.

    Returns:
        ``[x0, y0, x1, y1]`` normalised to ``[0, 1]`` of the original image (x over width, y over height).
    """
    _check_frame(frame)
    side = owl_square_side(width, height)
    b = _as_boxes(boxes)
    if frame == "unit_square":
        b = cxcywh_to_xyxy(b)
    if frame in ("unit_square", "unit_square_xyxy"):
        b = denormalise_xyxy(b, side, side)
    out = normalise_xyxy(b, width, height)
    return clip_unit(out) if clip else out


def original_to_owl(boxes, width: int, height: int, frame: str = "padded_pixels"):
    """Inverse of :func:`owl_to_original` (without clipping): project boxes -> OWLv2 ``frame``.

    Args:
        boxes: ``[..., 4]`` ``[x0, y0, x1, y1]`` normalised to the original ``width`` x ``height`` image.
        width, height: size in pixels of the original image.
        frame: one of :data:`OWL_FRAMES`.

    Returns:
        ``[..., 4]`` boxes in ``frame``: padded-square pixels (xyxy), unit-square cxcywh or unit-square xyxy.
    """
    _check_frame(frame)
    side = owl_square_side(width, height)
    b = denormalise_xyxy(boxes, width, height)
    if frame == "padded_pixels":
        return b
    b = normalise_xyxy(b, side, side)
    return xyxy_to_cxcywh(b) if frame == "unit_square" else b
