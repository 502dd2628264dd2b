"""Does the grounding learn? Held-out probes of a GRAIN model's boxes and region embeddings.

Training-batch statistics (``matched_giou``, ``rd_acc``) can look good while the model ignores the image: with
many anchored queries, boxes that never move already overlap the targets. These probes separate that out:

* ``best_query_giou``: mean over target descriptions of the best GIoU among the image's predicted boxes;
* ``static_giou``: the same, but scoring each target against the boxes predicted for a *different* image — what a
  model whose boxes do not depend on the image gets; grounding means ``best_query_giou`` clearly above it;
* ``text_query_giou``: GIoU of the box of the query whose region embedding is closest to the description's text
  embedding — the box the model would *show* for a description (what region-aware scoring relies on);
* ``rd_acc``: fraction of descriptions whose closest region query (by cosine) is the query matched to them by
  box cost, i.e. boxes and embeddings agree; and ``text_rd_acc``: for each description, whether among the
  image's descriptions it is the closest (cosine) to its text-chosen query.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchvision.ops import box_convert, generalized_box_iou

from grain.train.data import TrainLoader
from grain.train.model import GrainModel


@torch.no_grad()
def grounding_probe(model: GrainModel, samples_dir: str | Path, descriptions_dir: str | Path | None,
                    regions_dir: str | Path, *, batches: int = 4, batch_size: int = 64, seed: int = 12345,
                    max_regions: int = 5) -> dict[str, Any]:
    """Run the probes on ``batches`` batches drawn with ``seed`` (use a split not trained on for a held-out view)."""
    if not model.uses_decoder:
        raise ValueError(f"mode {model.mode!r} has no region queries to probe")
    was_training = model.training
    model.eval()
    sums = {"best_query_giou": 0.0, "static_giou": 0.0, "text_query_giou": 0.0, "text_rd_acc": 0.0}
    n = 0
    loader = TrainLoader(samples_dir, descriptions_dir, regions_dir, batch_size=batch_size, image_size=model.image_size,
                         context_length=model.context_length, max_regions=max_regions, rewrite_prob=0.0, seed=seed,
                         num_workers=1, prefetch=0)
    try:
        it = iter(loader)
        for _ in range(batches):
            b = next(it)
            out = model(b.images, b.captions, b.desc_tokens)
            boxes = box_convert(out["boxes"], "cxcywh", "xyxy")  # [B,Q,4]
            tgt = box_convert(b.desc_boxes, "cxcywh", "xyxy")  # [M,4]
            bsz = boxes.shape[0]
            for j in range(tgt.shape[0]):
                i = int(b.desc_image[j])
                giou = generalized_box_iou(boxes[i], tgt[j : j + 1])[:, 0]  # [Q]
                other = generalized_box_iou(boxes[(i + 1) % bsz], tgt[j : j + 1])[:, 0]
                sims = out["region_embed"][i] @ out["desc_embed"][j]  # [Q]
                q = int(sims.argmax())
                own = (b.desc_image == i).nonzero().flatten()
                closest = int(own[(out["desc_embed"][own] @ out["region_embed"][i, q]).argmax()])
                sums["best_query_giou"] += float(giou.max())
                sums["static_giou"] += float(other.max())
                sums["text_query_giou"] += float(giou[q])
                sums["text_rd_acc"] += float(closest == j)
                n += 1
    finally:
        loader.close()
        model.train(was_training)
    result = {k: v / max(n, 1) for k, v in sums.items()}
    result["descriptions"] = n
    return result
