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

Losses per mode (``TrainMode.losses`` in grain.config.TRAIN_MODES):

* ``loss_ic``: symmetric InfoNCE between images and captions on the *global* batch (all ranks' features).
* ``loss_bbox`` / ``loss_giou``: after Hungarian matching of each image's Q predicted boxes to its description
  boxes (cost ``5 L1 - 2 GIoU``), the summed L1 (over the 4 coordinates) and ``1 - GIoU`` of the matched pairs,
  divided by ``num_boxes`` = global number of description boxes / world size, clamped to >= 1 (DETR).
* ``loss_rd``: for every matched (region query, description) pair, cross-entropy of
  ``logit_scale * region · desc_all^T`` over *all* descriptions of the global batch, the matched description
  being the positive; mean over all matched pairs of the global batch. In ``no_box`` the matching cost is
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

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from grain.config import TRAIN_MODES

from .dist import all_reduce_sum, gather_with_local_grad, get_world_size, scale_grad, scale_local_grad
from .matcher import HungarianMatcher

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


def image_caption_loss(image: Tensor, text: Tensor, logit_scale: Tensor) -> tuple[Tensor, Tensor, int]:
    """Symmetric InfoNCE on the global batch (collective).

    Args:
        image: ``[B,D]`` local image embeddings (L2-normalised).
        text: ``[B,D]`` local caption embeddings, row i pairs with image i.
        logit_scale: scalar temperature (exp'd).

    Returns:
        ``(loss, acc, offset)``: the mean of the image→text and text→image cross-entropies over the ``N`` images
        of the global batch (every rank computes the full ``[N,N]`` logits, so the value is identical on all
        ranks; gradient ×W via :func:`scale_local_grad`), the detached image→text top-1 accuracy, and the index
        of this rank's first image in the global batch.
    """
    img_all, offset = gather_with_local_grad(image)
    txt_all, _ = gather_with_local_grad(text)
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

    Returns:
        ``(loss, acc, K_global)``: mean cross-entropy over the ``K_global`` queries of the global batch (identical
        on every rank; gradient ×W via :func:`scale_local_grad`; an exact 0 with a gradient path when there is no
        query anywhere), the detached top-1 accuracy (0 when none), and ``K_global``.
    """
    desc_all, desc_offset = gather_with_local_grad(descs)  # [Mg,D]
    query_all, _ = gather_with_local_grad(queries)  # [Kg,D]
    pos_all, _ = gather_with_local_grad(positives.to(torch.long) + desc_offset)  # [Kg] global description index
    group_all = gather_with_local_grad(groups)[0] if groups is not None else None  # [Mg]
    key_all = gather_with_local_grad(keys)[0] if keys is not None else None  # [Mg]
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
        logits = logits.masked_fill(mask, float("-inf"))
    loss = F.cross_entropy(logits, pos_all, reduction="sum") / k
    acc = (logits.detach().argmax(dim=1) == pos_all).float().mean()
    return scale_local_grad(loss), acc, k


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
    """

    def __init__(self, mode: str, weights: Mapping[str, float], cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 mask_duplicates: bool = False):
        super().__init__()
        if mode not in TRAIN_MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(TRAIN_MODES)}")
        missing = [k for k in TRAIN_MODES[mode].losses if k not in weights]
        if missing:
            raise ValueError(f"mode {mode!r} needs a weight for {', '.join(missing)}")
        self.mode = mode
        self.loss_names = TRAIN_MODES[mode].losses
        self.weights = {k: float(weights[k]) for k in self.loss_names}
        self.matcher = HungarianMatcher(cost_bbox, cost_giou)
        self.mask_duplicates = mask_duplicates

    # -- matching -----------------------------------------------------------------------------------------------

    @staticmethod
    def _descriptions_per_image(desc_image: Tensor, num_images: int) -> list[Tensor]:
        """``desc_image [M]`` → ``B`` LongTensors with the (ascending) description indices of each image."""
        desc_image = desc_image.to(torch.long)
        order = torch.argsort(desc_image, stable=True)
        counts = torch.bincount(desc_image, minlength=num_images)
        if counts.numel() > num_images:
            raise ValueError(f"desc_image refers to image {int(desc_image.max())} of a batch of {num_images}")
        return list(order.split(counts.tolist()))

    @torch.no_grad()
    def match(self, outputs: Mapping[str, Any], targets: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Hungarian matching of every image's region queries to its descriptions.

        Returns:
            ``(batch_idx, query_idx, desc_idx)``, each ``[K]`` long on the device of the outputs: matched pair
            ``k`` is query ``query_idx[k]`` of image ``batch_idx[k]`` and description ``desc_idx[k]`` (an index into
            the local ``M`` descriptions). Cost: ``5 L1 - 2 GIoU`` of the boxes, or ``-cos(region, description)``
            in ``no_box``.
        """
        region = outputs["region_embed"] if self.mode == "no_box" else None
        boxes = outputs["boxes"] if self.mode != "no_box" else None
        ref = region if region is not None else boxes
        b, q = ref.shape[:2]
        device = ref.device
        per_image = self._descriptions_per_image(targets["desc_image"].to(device), b)
        if region is not None:
            desc = self._desc_embed(outputs, targets)
            cost = [-(region[i] @ desc[idx].T) for i, idx in enumerate(per_image)]  # [Q,n_i]
            # with cost_override the matcher only reads the shapes of its box arguments
            matches = self.matcher(region.new_zeros(b, q, 4), [desc[idx] for idx in per_image], cost_override=cost)
        else:
            desc_boxes = targets["desc_boxes"].to(device)
            matches = self.matcher(boxes.detach(), [desc_boxes[idx] for idx in per_image])
        batch_idx, query_idx, desc_idx = [], [], []
        for i, ((pred, tgt), idx) in enumerate(zip(matches, per_image)):
            batch_idx.append(torch.full_like(pred, i))
            query_idx.append(pred)
            desc_idx.append(idx.cpu()[tgt])
        return tuple(torch.cat(x).to(device) for x in (batch_idx, query_idx, desc_idx))  # type: ignore[return-value]

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
        self, boxes: Tensor, desc_boxes: Tensor, batch_idx: Tensor, query_idx: Tensor, desc_idx: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """L1 and GIoU losses of the matched pairs (collective: the box count is all-reduced).

        Args:
            boxes: ``[B,Q,4]`` predicted (cx, cy, w, h). desc_boxes: ``[M,4]`` target (cx, cy, w, h).
            batch_idx, query_idx, desc_idx: ``[K]`` matched pairs (see :meth:`match`).

        Returns:
            ``(loss_bbox, loss_giou, stats)``; stats (detached): ``num_boxes`` (global number of target boxes) and
            ``matched_giou`` (mean GIoU of the global matched pairs, 0 when none).
        """
        src = boxes[batch_idx, query_idx]  # [K,4]; empty K keeps a gradient path to `boxes`
        tgt = desc_boxes.to(src)[desc_idx]  # [K,4]
        l1 = (src - tgt).abs().sum()
        giou = paired_giou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"))  # [K]
        world = get_world_size()
        n_global = all_reduce_sum(torch.tensor(float(desc_boxes.shape[0]), device=src.device))
        num_boxes = (n_global / world).clamp(min=1.0)
        loss_bbox = l1 / num_boxes
        loss_giou = (1.0 - giou).sum() / num_boxes
        giou_sum, pairs = all_reduce_sum(torch.stack([giou.detach().sum(), giou.new_tensor(float(giou.numel()))]))
        stats = {"num_boxes": n_global, "matched_giou": giou_sum / pairs.clamp(min=1.0)}
        return loss_bbox, loss_giou, stats

    def forward(self, outputs: Mapping[str, Any], targets: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns ``(total, logs)``.

        ``total`` = ``sum_k weights[k] * loss_k`` over the mode's losses. ``logs`` holds every unweighted loss
        (attached to the graph) plus detached statistics: ``ic_acc`` (always), ``num_boxes`` and ``matched_giou``
        (modes with box losses), ``rd_acc`` (modes with ``loss_rd``).
        """
        image = outputs["image_embed"]
        # Replicated temperature: its gradient is divided by W here and multiplied back by W in the global losses.
        logit_scale = scale_grad(outputs["logit_scale"], 1.0 / get_world_size())
        losses: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}

        losses["loss_ic"], stats["ic_acc"], image_offset = image_caption_loss(image, outputs["text_embed"], logit_scale)

        if TRAIN_MODES[self.mode].matching:
            batch_idx, query_idx, desc_idx = self.match(outputs, targets)
        if "loss_bbox" in self.loss_names:
            losses["loss_bbox"], losses["loss_giou"], box_stats = self.box_losses(
                outputs["boxes"], targets["desc_boxes"], batch_idx, query_idx, desc_idx
            )
            stats.update(box_stats)
        if "loss_rd" in self.loss_names:
            desc = self._desc_embed(outputs, targets)
            if self.mode == "clip_desc":
                desc_image = targets["desc_image"].to(device=image.device, dtype=torch.long)
                queries = image[desc_image]  # [M,D]: each description's own image
                positives = torch.arange(desc.shape[0], device=image.device)
                groups = desc_image + image_offset  # global image index of each description
            else:
                queries = outputs["region_embed"][batch_idx, query_idx]  # [K,D]
                positives, groups = desc_idx, None
            keys = targets.get("desc_key") if self.mask_duplicates else None
            if self.mask_duplicates and keys is None:
                raise KeyError("mask_duplicates needs targets['desc_key'] (grain.train.losses.text_keys of the tokens)")
            losses["loss_rd"], stats["rd_acc"], _ = region_description_loss(
                queries, desc, positives, logit_scale, groups, None if keys is None else keys.to(image.device)
            )

        total = weighted_total(losses, self.weights)
        logs = dict(losses)
        logs.update({k: v.detach() for k, v in stats.items()})
        return total, logs
