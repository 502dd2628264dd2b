"""The GRAIN training criterion: image–caption contrast, box regression and region–description contrast.

Inputs (see :class:`grain.train.model.GrainModel`; every embedding is already L2-normalised)::

    outputs["image_embed"]   [B,D]    global image embeddings
    outputs["text_embed"]    [B,D]    caption embeddings (row i = caption of image i)
    outputs["region_embed"]  [B,Q,D]  region query embeddings               (decoder modes)
    outputs["boxes"]         [B,Q,4]  (cx, cy, w, h) in [0, 1]               (decoder modes)
    outputs["desc_embed"]    [M,D]    embeddings of the local descriptions    (may be absent when M == 0)
    outputs["logit_scale"]   []       exp'd temperature shared by every contrastive loss
    targets["desc_image"]    [M] long index (0..B-1) of each description's image
    targets["desc_boxes"]    [M,4]    (cx, cy, w, h) in [0, 1] of each description's region
    targets["desc_key"]      [M] long text identity of each description (``mask_duplicates``; :func:`text_keys`)
    targets["desc_counts"]   optional: B host ints, descriptions per image (grouped by image, as the loader makes them)
    targets["sizes"]         optional: every rank's row counts {"images", "descs", "pairs"} (grain.train.dist.all_gather_ints)

The two optional host-side entries let the training step run without reading anything back from the GPU but the
one ``[B,Q,M]`` matching-cost block; without them the criterion works out the same on the device (with host syncs).

Losses per mode (``TrainMode.losses`` in grain.config.TRAIN_MODES):

* ``loss_ic``: symmetric InfoNCE between images and captions on the *global* batch (all ranks' features).
* ``loss_bbox`` / ``loss_giou``: after Hungarian matching of each image's Q predicted boxes to its description
  boxes (cost ``5 L1 - 2 GIoU``), the summed L1 (over the 4 coordinates) and ``1 - GIoU`` of the matched pairs,
  divided by ``num_boxes`` = global number of description boxes / world size, clamped to >= 1 (DETR).
* ``loss_sel`` (decoders with ``query_type: selected``, in every decoder mode): trains the head that scores the
  patch tokens the region queries are chosen from. Sigmoid focal loss (α 0.25, γ 2, as two-stage DETRs train their
  proposal scores) over all ``P`` patches of every image, summed and divided by ``num_boxes``; the positives are
  the patches that hold a description box's centre (``no_box``, which trains no box: the patches of the queries
  matched to a description). Its weight is ``weights["loss_sel"]`` (default 1).
* ``loss_rd``: for every matched (region query, description) pair, cross-entropy of
  ``logit_scale * region · desc_all^T`` over *all* descriptions of the global batch, the matched description
  being the positive; mean over all matched pairs of the global batch (``rd_negatives="rank"``: only the
  descriptions of the query's own rank, or simulated rank, are in its softmax, and the loss is the mean over
  ranks of each rank's mean, as the authors' per-GPU loss under DDP). In ``no_box`` the matching cost is
  ``-cos(region, description)`` (the boxes are not trained). In ``clip_desc`` there are no regions: the query
  of description ``j`` is the global embedding of its image, and the *other* descriptions of that same image
  are removed from the row's softmax (set to ``-inf``), since they describe the same image and are positives
  too — only descriptions of other images act as negatives.

Distributed training (DDP): the global-batch losses (``loss_ic``, ``loss_rd``) are identical on every rank and
back-propagate into the local features only; :func:`grain.train.dist.scale_local_grad` multiplies their gradient
by W so that DDP's averaging yields the single-process gradient of the global batch. The replicated
``logit_scale`` receives the full gradient of those losses on every rank, so its gradient is pre-divided by W
(:func:`grain.train.dist.scale_grad`), which after the W scaling and DDP's averaging again equals the
single-process gradient. The box losses are local sums normalised by ``num_boxes``, whose DDP average equals the
single-process loss (as long as the clamp to 1 is inactive). Every rank must call the criterion in step: it runs
collectives even when its own batch has no description.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, sigmoid_focal_loss

from grain.config import TRAIN_MODES

from .dist import all_reduce_sum, gather_with_local_grad, get_rank, get_world_size, scale_grad, scale_local_grad
from .matcher import HungarianMatcher, assign_blocks

def weighted_total(losses: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """``sum_k weights[k] * losses[k]`` over the keys of ``losses`` (the only place where weights are applied)."""
    if not losses:
        raise ValueError("no loss to weight")
    terms = [float(weights[k]) * v for k, v in losses.items()]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _zero_with_graph(*tensors: Tensor) -> Tensor:
    """An exact 0 that still depends on ``tensors`` (so ``backward`` works and yields zero gradients)."""
    zero = tensors[0].sum() * 0.0
    for t in tensors[1:]:
        zero = zero + t.sum().to(zero) * 0.0
    return zero


def paired_giou(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """Generalised IoU of corresponding boxes: ``a [K,4]``, ``b [K,4]`` (x1, y1, x2, y2) → ``[K]``.

    Unlike ``torchvision.ops.generalized_box_iou`` (all pairs, ``[K,K]``) only the K matched pairs are computed.
    """
    inter_wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a + area_b - inter
    hull_wh = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp(min=0)
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return inter / union.clamp(min=eps) - (hull - union) / hull.clamp(min=eps)


def image_caption_loss(image: Tensor, text: Tensor, logit_scale: Tensor,
                       sizes: list[int] | None = None) -> tuple[Tensor, Tensor, int]:
    """Symmetric InfoNCE on the global batch (collective).

    Args:
        image: ``[B,D]`` local image embeddings (L2-normalised).
        text: ``[B,D]`` local caption embeddings, row i pairs with image i.
        logit_scale: scalar temperature (exp'd).
        sizes: every rank's ``B`` when known (no size exchange on the device then).

    Returns:
        ``(loss, acc, offset)``: the mean of the image→text and text→image cross-entropies over the ``N`` images
        of the global batch (every rank computes the full ``[N,N]`` logits, so the value is identical on all
        ranks; gradient ×W via :func:`scale_local_grad`), the detached image→text top-1 accuracy, and the index
        of this rank's first image in the global batch.
    """
    img_all, offset = gather_with_local_grad(image, sizes)
    txt_all, _ = gather_with_local_grad(text, sizes)
    n = img_all.shape[0]
    if n == 0:
        return _zero_with_graph(image, text, logit_scale), torch.zeros((), device=image.device), offset
    logits = logit_scale * img_all @ txt_all.T  # [N,N]
    labels = torch.arange(n, device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    acc = (logits.detach().argmax(dim=1) == labels).float().mean()
    return scale_local_grad(loss), acc, offset


def region_description_loss(
    queries: Tensor,
    descs: Tensor,
    positives: Tensor,
    logit_scale: Tensor,
    groups: Tensor | None = None,
    keys: Tensor | None = None,
    desc_sizes: list[int] | None = None,
    query_sizes: list[int] | None = None,
    query_blocks: Tensor | None = None,
    desc_blocks: Tensor | None = None,
) -> tuple[Tensor, Tensor, int]:
    """Query→description InfoNCE against every description of the global batch (collective).

    Args:
        queries: ``[K,D]`` local query embeddings (matched region embeddings, or image embeddings in clip_desc).
        descs: ``[M,D]`` local description embeddings.
        positives: ``[K]`` long, index into the *local* ``descs`` of each query's positive.
        logit_scale: scalar temperature (exp'd).
        groups: optional ``[M]`` long, a *globally unique* group id per description (clip_desc: the global image
            index). Descriptions sharing the positive's group, other than the positive itself, are masked out
            (``-inf``) of that query's softmax: they are positives too and must not act as negatives.
        keys: optional ``[M]`` long text identity per description (:func:`text_keys`). Other descriptions with
            the positive's exact text are masked out the same way: "a red body" of another image is the same
            target, not a negative (the synthetic world and real MLLM output repeat short phrases a lot, and
            without the mask the positive is ambiguous and the loss has a floor of log(copies)).
        desc_sizes, query_sizes: every rank's ``M`` and ``K`` when known (no size exchange on the device then).
        query_blocks, desc_blocks: optional ``[K]`` / ``[M]`` long, a *globally unique* block id per query and per
            description (``rd_negatives: rank``: the rank, or a simulated rank, the row's image belongs to). A
            query then contrasts only with the descriptions of its own block, and the loss is the mean over blocks
            of each block's mean — the authors' per-GPU loss, averaged over GPUs as DDP averages their gradients.

    Returns:
        ``(loss, acc, K_global)``: mean cross-entropy over the ``K_global`` queries of the global batch (identical
        on every rank; gradient ×W via :func:`scale_local_grad`; an exact 0 with a gradient path when there is no
        query anywhere), the detached top-1 accuracy (0 when none), and ``K_global``.
    """
    desc_all, desc_offset = gather_with_local_grad(descs, desc_sizes)  # [Mg,D]
    query_all, _ = gather_with_local_grad(queries, query_sizes)  # [Kg,D]
    # [Kg] global description index of each query's positive
    pos_all, _ = gather_with_local_grad(positives.to(torch.long) + desc_offset, query_sizes)
    group_all = gather_with_local_grad(groups, desc_sizes)[0] if groups is not None else None  # [Mg]
    key_all = gather_with_local_grad(keys, desc_sizes)[0] if keys is not None else None  # [Mg]
    blocked = query_blocks is not None
    if blocked != (desc_blocks is not None):
        raise ValueError("query_blocks and desc_blocks go together")
    qblock_all = gather_with_local_grad(query_blocks, query_sizes)[0] if blocked else None  # [Kg]
    dblock_all = gather_with_local_grad(desc_blocks, desc_sizes)[0] if blocked else None  # [Mg]
    k = query_all.shape[0]
    if k == 0:
        zero = _zero_with_graph(queries, descs, logit_scale)
        return zero, torch.zeros((), device=zero.device), 0
    logits = logit_scale * query_all @ desc_all.T  # [Kg,Mg]
    mask = torch.zeros_like(logits, dtype=torch.bool)
    for ids in (group_all, key_all):
        if ids is not None:
            mask |= ids[pos_all][:, None] == ids[None, :]  # [Kg,Mg]
    if group_all is not None or key_all is not None:
        mask[torch.arange(k, device=logits.device), pos_all] = False
    if blocked:  # other blocks' descriptions are not negatives (the positive is always in the query's own block)
        mask |= qblock_all[:, None] != dblock_all[None, :]
    if group_all is not None or key_all is not None or blocked:
        logits = logits.masked_fill(mask, float("-inf"))
    if blocked:
        loss = (F.cross_entropy(logits, pos_all, reduction="none") * _block_weights(qblock_all)).sum()
    else:
        loss = F.cross_entropy(logits, pos_all, reduction="sum") / k
    acc = (logits.detach().argmax(dim=1) == pos_all).float().mean()
    return scale_local_grad(loss), acc, k


def _block_weights(blocks: Tensor) -> Tensor:
    """``[K]`` block ids → ``[K]`` weights ``1 / (G · K_b)`` (``K_b`` rows in the row's block, ``G`` blocks): a
    weighted sum is the mean over blocks of each block's mean. Computed without reading anything back (sorting
    numbers the blocks; the shapes are the input's)."""
    k = blocks.shape[0]
    ordered, order = blocks.sort()
    first = torch.ones(k, dtype=torch.bool, device=blocks.device)
    first[1:] = ordered[1:] != ordered[:-1]
    dense = torch.empty(k, dtype=torch.long, device=blocks.device)
    dense[order] = first.long().cumsum(0) - 1  # block number 0..G-1 of every row
    counts = torch.zeros(k, dtype=torch.float32, device=blocks.device).scatter_add_(0, dense, torch.ones(k, device=blocks.device))
    num_blocks = (counts > 0).sum().float()
    return 1.0 / (counts[dense] * num_blocks)


def centre_patches(boxes: Tensor, grid: int) -> Tensor:
    """``[M,4]`` (cx, cy, w, h) in [0, 1] → ``[M]`` long index of the patch (row-major on a ``grid × grid`` grid,
    as the ViT orders its tokens) that holds each box's centre."""
    col = (boxes[:, 0] * grid).floor().clamp(0, grid - 1).long()
    row = (boxes[:, 1] * grid).floor().clamp(0, grid - 1).long()
    return row * grid + col


def selection_loss(logits: Tensor, positives: tuple[Tensor, Tensor], num_boxes: Tensor) -> Tensor:
    """Sigmoid focal loss of the patch scores ``logits [B,P]`` against the target that is 1 at the
    ``(image, patch)`` pairs ``positives`` and 0 elsewhere, summed and divided by ``num_boxes``."""
    target = torch.zeros_like(logits)
    target[positives] = 1.0
    return sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0, reduction="sum") / num_boxes


def text_keys(tokens: Tensor) -> Tensor:
    """``[M,T]`` token ids → ``[M]`` long keys, equal exactly for equal token rows (polynomial hash mod 2^31−1;
    a collision merely masks one extra negative)."""
    key = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    for col in tokens.to(torch.long).unbind(dim=1):
        key = (key * 1_000_003 + col) % 2_147_483_647
    return key


class GrainCriterion(nn.Module):
    """Computes the weighted training loss of one mode (see the module docstring).

    Args:
        mode: a key of grain.config.TRAIN_MODES.
        weights: a weight per loss of the mode (extra keys are ignored; a missing one is an error).
        cost_bbox, cost_giou: the Hungarian matching cost ``cost_bbox * L1 - cost_giou * GIoU``.
        mask_duplicates: in ``loss_rd``, mask out descriptions whose text equals the positive's (needs
            ``targets["desc_key"]``, see :func:`text_keys`); off = the authors' loss.
        match_repeats: one-to-many matching (H-DETR's one-to-many assignment, on the same queries): each
            description is matched to up to this many region queries (its column repeated in the cost); 1 = DETR.
        rd_negatives: ``"global"`` (every description of the global batch is a negative in ``loss_rd``) or
            ``"rank"`` (only those of the query's own rank: the authors' loss; see ``rd_rank_images``).
        rd_rank_images: with ``"rank"``, images per block of each process's batch whose descriptions are each
            other's negatives (None: the whole process batch); below the batch size it simulates ranks.
    """

    def __init__(self, mode: str, weights: Mapping[str, float], cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 mask_duplicates: bool = False, match_repeats: int = 1, rd_negatives: str = "global",
                 rd_rank_images: int | None = None):
        super().__init__()
        if mode not in TRAIN_MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(TRAIN_MODES)}")
        missing = [k for k in TRAIN_MODES[mode].losses if k not in weights]
        if missing:
            raise ValueError(f"mode {mode!r} needs a weight for {', '.join(missing)}")
        self.mode = mode
        self.loss_names = TRAIN_MODES[mode].losses
        self.weights = {k: float(weights[k]) for k in self.loss_names}
        self.weights["loss_sel"] = float(weights.get("loss_sel", 1.0))  # used only by query_type "selected"
        self.matcher = HungarianMatcher(cost_bbox, cost_giou)
        self.mask_duplicates = mask_duplicates
        if match_repeats < 1:
            raise ValueError(f"match_repeats must be >= 1, got {match_repeats}")
        self.match_repeats = int(match_repeats)
        if rd_negatives not in ("global", "rank"):
            raise ValueError(f"rd_negatives must be 'global' or 'rank', got {rd_negatives!r}")
        if rd_rank_images is not None and rd_rank_images < 1:
            raise ValueError(f"rd_rank_images must be >= 1, got {rd_rank_images}")
        self.rd_negatives = rd_negatives
        self.rd_rank_images = rd_rank_images

    @classmethod
    def from_config(cls, cfg: Any, mode: str | None = None) -> GrainCriterion:
        """The criterion a :class:`grain.config.TrainConfig` describes (``mode`` overrides ``cfg.mode``)."""
        return cls(mode or cfg.mode, cfg.weights, cost_bbox=cfg.cost_bbox, cost_giou=cfg.cost_giou,
                   mask_duplicates=cfg.mask_duplicate_descriptions, match_repeats=cfg.match_repeats,
                   rd_negatives=cfg.rd_negatives, rd_rank_images=cfg.rd_rank_images)

    def rd_blocks(self, image_index: Tensor) -> Tensor | None:
        """``rd_negatives: rank``: the globally unique L_rd block of rows whose local image is ``image_index``
        (rank × 2^32 + image // rd_rank_images); None with global negatives."""
        if self.rd_negatives == "global":
            return None
        block = image_index.to(torch.long)
        if self.rd_rank_images is None:  # the whole process batch is one block
            block = torch.zeros_like(block)
        else:
            block = torch.div(block, self.rd_rank_images, rounding_mode="floor")
        return block + get_rank() * (1 << 32)

    # -- matching -----------------------------------------------------------------------------------------------

    @staticmethod
    def descriptions_per_image(targets: Mapping[str, Any], num_images: int) -> list[np.ndarray]:
        """The description indices of each image, on the host.

        From ``targets["desc_counts"]`` (host ints, descriptions grouped by image as the loader makes them) without
        touching the device; otherwise from ``desc_image`` (read back from the device, any order).
        """
        counts = targets.get("desc_counts")
        if counts is not None:
            if len(counts) != num_images:
                raise ValueError(f"desc_counts has {len(counts)} entries for a batch of {num_images} images")
            return np.split(np.arange(sum(counts), dtype=np.int64), np.cumsum(counts)[:-1])
        desc_image = targets["desc_image"].detach().cpu().numpy().astype(np.int64)
        if desc_image.size and desc_image.max() >= num_images:
            raise ValueError(f"desc_image refers to image {int(desc_image.max())} of a batch of {num_images}")
        order = np.argsort(desc_image, kind="stable")
        return np.split(order, np.cumsum(np.bincount(desc_image, minlength=num_images))[:-1])

    @torch.no_grad()
    def match(self, outputs: Mapping[str, Any], targets: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Hungarian matching of every image's region queries to its descriptions.

        Returns:
            ``(batch_idx, query_idx, desc_idx)``, each ``[K]`` long on the device of the outputs: matched pair
            ``k`` is query ``query_idx[k]`` of image ``batch_idx[k]`` and description ``desc_idx[k]`` (an index into
            the local ``M`` descriptions). Cost: ``5 L1 - 2 GIoU`` of the boxes, or ``-cos(region, description)``
            in ``no_box``. The ``[B, Q, M]`` cost block is computed on the device and read back once.
        """
        ref = outputs["region_embed"] if self.mode == "no_box" else outputs["boxes"]
        b, q = ref.shape[:2]
        device = ref.device
        per_image = self.descriptions_per_image(targets, b)
        m = sum(len(idx) for idx in per_image)
        if m == 0 or q == 0:
            cost = np.zeros((b, q, m))
        elif self.mode == "no_box":
            desc = self._desc_embed(outputs, targets)
            cost = -(ref.flatten(0, 1) @ desc.T).float().view(b, q, m).cpu().numpy()
        else:
            tgt = targets["desc_boxes"].to(device)
            cost = self.matcher.cost(ref.detach().flatten(0, 1), tgt).view(b, q, m).cpu().numpy()
        if self.match_repeats > 1:  # one-to-many: every description is a target up to match_repeats times
            per_image = [np.tile(idx, self.match_repeats) for idx in per_image]
        pairs = assign_blocks(cost, per_image)
        return tuple(torch.from_numpy(x).to(device, non_blocking=True) for x in pairs)  # type: ignore[return-value]

    def num_pairs(self, desc_counts: list[int], num_queries: int) -> int:
        """Matched pairs of a batch: ``sum_i min(Q, r · n_i)`` (r = match_repeats; 1: one-to-one matching)."""
        return sum(min(num_queries, self.match_repeats * n) for n in desc_counts)

    # -- losses -------------------------------------------------------------------------------------------------

    @staticmethod
    def _desc_embed(outputs: Mapping[str, Any], targets: Mapping[str, Tensor]) -> Tensor:
        """``outputs["desc_embed"]`` ``[M,D]``; an empty ``[0,D]`` when absent and there is no description."""
        desc = outputs.get("desc_embed")
        if desc is not None:
            return desc
        if targets["desc_image"].numel():
            raise KeyError("outputs has no 'desc_embed' but targets has descriptions")
        image = outputs["image_embed"]
        return image.new_zeros((0, image.shape[-1]))

    def box_losses(
        self, boxes: Tensor, desc_boxes: Tensor, batch_idx: Tensor, query_idx: Tensor, desc_idx: Tensor,
        desc_sizes: list[int] | None = None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """L1 and GIoU losses of the matched pairs (collective: the box count is all-reduced).

        Args:
            boxes: ``[B,Q,4]`` predicted (cx, cy, w, h). desc_boxes: ``[M,4]`` target (cx, cy, w, h).
            batch_idx, query_idx, desc_idx: ``[K]`` matched pairs (see :meth:`match`).
            desc_sizes: every rank's ``M`` when known (the global box count is then their sum, no collective).

        Returns:
            ``(loss_bbox, loss_giou, stats)``; stats (detached): ``num_boxes`` (global number of target boxes) and
            ``matched_giou`` (mean GIoU of the global matched pairs, 0 when none).
        """
        src = boxes[batch_idx, query_idx]  # [K,4]; empty K keeps a gradient path to `boxes`
        tgt = desc_boxes.to(src)[desc_idx]  # [K,4]
        l1 = (src - tgt).abs().sum()
        giou = paired_giou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"))  # [K]
        n_global, num_boxes = self.num_boxes(desc_boxes.shape[0], src.device, desc_sizes)
        loss_bbox = l1 / num_boxes
        loss_giou = (1.0 - giou).sum() / num_boxes
        giou_sum, pairs = all_reduce_sum(torch.stack([giou.detach().sum(), giou.new_tensor(float(giou.numel()))]))
        stats = {"num_boxes": n_global, "matched_giou": giou_sum / pairs.clamp(min=1.0)}
        return loss_bbox, loss_giou, stats

    @staticmethod
    def num_boxes(local: int, device: torch.device, desc_sizes: list[int] | None = None) -> tuple[Tensor, Tensor]:
        """``(global number of description boxes, that / world size clamped to >= 1)`` — DETR's normaliser
        (collective unless ``desc_sizes``, every rank's count, is given)."""
        if desc_sizes is not None:
            n_global = torch.tensor(float(sum(desc_sizes)), device=device)
        else:
            n_global = all_reduce_sum(torch.tensor(float(local), device=device))
        return n_global, (n_global / get_world_size()).clamp(min=1.0)

    @property
    def matching(self) -> bool:
        """Whether the mode matches region queries to descriptions (:meth:`match`)."""
        return TRAIN_MODES[self.mode].matching

    def forward(self, outputs: Mapping[str, Any], targets: Mapping[str, Any],
                matches: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns ``(total, logs)``. ``matches``: the result of :meth:`match` on these outputs' values, when the
        caller has it already (gradient accumulation matches the full batch once for all its micro-batches).

        ``total`` = ``sum_k weights[k] * loss_k`` over the mode's losses. ``logs`` holds every unweighted loss
        (attached to the graph) plus detached statistics: ``ic_acc`` (always), ``num_boxes`` and ``matched_giou``
        (modes with box losses), ``rd_acc`` (modes with ``loss_rd``).
        """
        image = outputs["image_embed"]
        # Replicated temperature: its gradient is divided by W here and multiplied back by W in the global losses.
        logit_scale = scale_grad(outputs["logit_scale"], 1.0 / get_world_size())
        losses: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}

        sizes = targets.get("sizes") or {}
        losses["loss_ic"], stats["ic_acc"], image_offset = image_caption_loss(
            image, outputs["text_embed"], logit_scale, sizes.get("images"))

        if self.matching:
            batch_idx, query_idx, desc_idx = matches if matches is not None else self.match(outputs, targets)
        if "loss_bbox" in self.loss_names:
            losses["loss_bbox"], losses["loss_giou"], box_stats = self.box_losses(
                outputs["boxes"], targets["desc_boxes"], batch_idx, query_idx, desc_idx, sizes.get("descs")
            )
            stats.update(box_stats)
        if "loss_rd" in self.loss_names:
            desc = self._desc_embed(outputs, targets)
            desc_image = targets["desc_image"].to(device=image.device, dtype=torch.long)
            if self.mode == "clip_desc":
                queries = image[desc_image]  # [M,D]: each description's own image
                positives = torch.arange(desc.shape[0], device=image.device)
                groups = desc_image + image_offset  # global image index of each description
                query_sizes = sizes.get("descs")
                query_image = desc_image
            else:
                queries = outputs["region_embed"][batch_idx, query_idx]  # [K,D]
                positives, groups = desc_idx, None
                query_sizes = sizes.get("pairs")
                query_image = batch_idx
            keys = targets.get("desc_key") if self.mask_duplicates else None
            if self.mask_duplicates and keys is None:
                raise KeyError("mask_duplicates needs targets['desc_key'] (grain.train.losses.text_keys of the tokens)")
            losses["loss_rd"], stats["rd_acc"], _ = region_description_loss(
                queries, desc, positives, logit_scale, groups, None if keys is None else keys.to(image.device),
                sizes.get("descs"), query_sizes, self.rd_blocks(query_image), self.rd_blocks(desc_image),
            )

        if "select_logits" in outputs:
            logits = outputs["select_logits"]
            if self.mode == "no_box":  # no box is trained: the patches of the matched queries are the positives
                positives = (batch_idx, outputs["select_index"][batch_idx, query_idx])
            else:
                grid = math.isqrt(logits.shape[1])
                desc_image = targets["desc_image"].to(device=logits.device, dtype=torch.long)
                positives = (desc_image, centre_patches(targets["desc_boxes"].to(logits.device), grid))
            _, num_boxes = self.num_boxes(targets["desc_boxes"].shape[0], logits.device, sizes.get("descs"))
            losses["loss_sel"] = selection_loss(logits.float(), positives, num_boxes)
        total = weighted_total(losses, self.weights)
        logs = dict(losses)
        logs.update({k: v.detach() for k, v in stats.items()})
        return total, logs
