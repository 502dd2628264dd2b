"""Hungarian matching between region queries and description boxes (DETR-style, one-to-one).

The cost of assigning query ``q`` to target ``t`` is ``cost_bbox * L1(q, t) - cost_giou * GIoU(q, t)`` with the
L1 distance taken on (cx, cy, w, h) and the generalised IoU on (x1, y1, x2, y2). Callers with a different notion
of similarity (the ``no_box`` ablation, which does not train boxes) solve their own cost block with
:func:`assign_blocks`.
Matching never back-propagates: it runs under ``torch.no_grad`` and on the CPU (scipy). The batch's costs are
computed on the device as one ``[B, Q, M]`` block (every query against every description of the batch) and read
back once (:func:`assign_blocks`): one host sync per training step, the only one outside logging steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

Match = tuple[Tensor, Tensor]
"""``(pred_idx [K], tgt_idx [K])``, LongTensors on the CPU, sorted by ``pred_idx``; ``K = min(Q, n)``."""


def box_cost(pred_boxes: Tensor, tgt_boxes: Tensor, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> Tensor:
    """Pairwise matching cost.

    Args:
        pred_boxes: ``[Q,4]`` (cx, cy, w, h).
        tgt_boxes: ``[T,4]`` (cx, cy, w, h).

    Returns:
        ``[Q,T]``: ``cost_bbox * ||p - t||_1 - cost_giou * GIoU(p, t)``.
    """
    l1 = torch.cdist(pred_boxes, tgt_boxes, p=1)
    giou = generalized_box_iou(box_convert(pred_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"))
    return cost_bbox * l1 - cost_giou * giou


def _solve(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optimal assignment of a ``[Q,n]`` host cost array → ``(pred_idx, tgt_idx)`` int64, sorted by ``pred_idx``."""
    if cost.shape[0] == 0 or cost.shape[1] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # A diverging model can give NaN/inf boxes; match anyway (the loss is then non-finite and the training loop's
    # guard skips the step) instead of letting scipy raise on the cost matrix.
    cost = np.nan_to_num(cost.astype(np.float64), nan=1e12, posinf=1e12, neginf=-1e12)
    rows, cols = linear_sum_assignment(cost)
    order = np.argsort(rows, kind="stable")
    return rows[order].astype(np.int64), cols[order].astype(np.int64)


def _assign(cost: Tensor) -> Match:
    """:func:`_solve` for a ``[Q,n]`` CPU cost tensor, as LongTensors."""
    pred, tgt = _solve(cost.numpy())
    return torch.from_numpy(pred), torch.from_numpy(tgt)


def assign_blocks(cost: np.ndarray, per_image: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Solve every image's assignment from one host-side cost array.

    Args:
        cost: ``[B, Q, M]`` (numpy): query ``q`` of image ``i`` against description ``j`` of the batch.
        per_image: ``B`` int arrays, the description indices (into ``M``) of each image.

    Returns:
        ``(batch_idx, query_idx, desc_idx)`` int64 arrays of the matched pairs, image by image, queries ascending.
    """
    out: list[list[np.ndarray]] = [[], [], []]
    for i, idx in enumerate(per_image):
        pred, tgt = _solve(cost[i][:, idx])
        out[0].append(np.full(len(pred), i, dtype=np.int64))
        out[1].append(pred)
        out[2].append(np.asarray(idx, dtype=np.int64)[tgt])
    if not out[0]:
        empty = np.zeros(0, np.int64)
        return empty, empty.copy(), empty.copy()
    return tuple(np.concatenate(parts) for parts in out)  # type: ignore[return-value]


@torch.no_grad()
def match_one(pred_boxes: Tensor, tgt_boxes: Tensor, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> Match:
    """Per-image matching: ``pred_boxes [Q,4]``, ``tgt_boxes [n,4]`` (cxcywh) → ``(pred_idx [K], tgt_idx [K])``.

    ``K = min(Q, n)``: with more targets than queries only ``Q`` targets are matched.
    """
    if pred_boxes.shape[0] == 0 or tgt_boxes.shape[0] == 0:
        return _assign(torch.zeros(pred_boxes.shape[0], tgt_boxes.shape[0]))
    cost = box_cost(pred_boxes.float(), tgt_boxes.float(), cost_bbox, cost_giou)
    return _assign(cost.cpu())


class HungarianMatcher:
    """Batched one-to-one matcher (see the module docstring for the cost)."""

    def __init__(self, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        self.cost_bbox = float(cost_bbox)
        self.cost_giou = float(cost_giou)

    def cost(self, pred_boxes: Tensor, tgt_boxes: Tensor) -> Tensor:
        """``[N,4]`` × ``[T,4]`` (cxcywh) → ``[N,T]`` float32 cost with this matcher's weights (on their device)."""
        return box_cost(pred_boxes.float(), tgt_boxes.float(), self.cost_bbox, self.cost_giou)

    @torch.no_grad()
    def __call__(self, pred_boxes: Tensor, tgt_boxes: Sequence[Tensor]) -> list[Match]:
        """Match every image's queries to its targets.

        Args:
            pred_boxes: ``[B,Q,4]`` (cx, cy, w, h).
            tgt_boxes: ``B`` tensors ``[n_i,4]`` (cx, cy, w, h); ``n_i`` may be 0.

        Returns:
            ``B`` pairs ``(pred_idx [K_i], tgt_idx [K_i])`` (CPU LongTensors sorted by ``pred_idx``,
            ``K_i = min(Q, n_i)``; empty when ``n_i == 0``).

        The box cost is computed once for all images against the concatenation of all targets
        (``[B*Q, sum n_i]``), moved to the CPU once, and each image's diagonal block is solved separately.
        """
        b, q = pred_boxes.shape[:2]
        if len(tgt_boxes) != b:
            raise ValueError(f"{len(tgt_boxes)} target tensors for a batch of {b} images")
        sizes = [int(t.shape[0]) for t in tgt_boxes]
        total = sum(sizes)
        if total == 0 or q == 0:
            return [_assign(torch.zeros(q, n)) for n in sizes]
        tgt = torch.cat([t.to(pred_boxes.device) for t in tgt_boxes]).float()
        cost = self.cost(pred_boxes.flatten(0, 1), tgt).view(b, q, total).cpu()
        return [_assign(c[i]) for i, c in enumerate(cost.split(sizes, dim=-1))]
