"""Hungarian matcher, GRAIN criterion and its distributed (gloo, 2 processes) equivalence with one process."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou

from grain.config import TRAIN_MODES
from grain.train.losses import GrainCriterion, centre_patches, paired_giou, selection_loss, text_keys
from grain.train.matcher import HungarianMatcher, assign_blocks, box_cost, match_one



@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one thread is faster; restored so later test modules keep the session's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

WEIGHTS = {"loss_ic": 0.7, "loss_bbox": 1.3, "loss_giou": 1.9, "loss_rd": 0.5}
LEAVES = ("image_embed", "text_embed", "region_embed", "boxes", "desc_embed")


# ------------------------------------------------------------------------------------------------ fixtures


def rand_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    """[n,4] cxcywh boxes well inside the unit square."""
    centre = 0.25 + 0.5 * torch.rand(n, 2, generator=g)
    size = 0.05 + 0.35 * torch.rand(n, 2, generator=g)
    return torch.cat([centre, size], dim=1)


def make_batch(counts: list[int], q: int = 4, d: int = 8, seed: int = 0, scale: float = 10.0):
    """A random batch: len(counts) images, counts[i] descriptions for image i (descriptions ordered by image)."""
    g = torch.Generator().manual_seed(seed)
    b, m = len(counts), sum(counts)

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=g), dim=-1)

    outputs = {
        "image_embed": unit(b, d),
        "text_embed": unit(b, d),
        "region_embed": unit(b, q, d),
        "boxes": rand_boxes(b * q, g).view(b, q, 4),
        "desc_embed": unit(m, d),
        "logit_scale": torch.tensor(scale),
    }
    targets = {
        "desc_image": torch.repeat_interleave(torch.arange(b), torch.tensor(counts, dtype=torch.long)),
        "desc_boxes": rand_boxes(m, g),
    }
    return outputs, targets


def as_leaves(outputs: dict) -> dict:
    return {k: v.detach().clone().requires_grad_(True) for k, v in outputs.items()}


def matched_cost(cost: torch.Tensor, pred: torch.Tensor, tgt: torch.Tensor) -> float:
    return float(cost[pred, tgt].sum())


def brute_force_min(cost: torch.Tensor) -> float:
    """Minimum total cost over every injection of the smaller side into the larger one."""
    q, t = cost.shape
    if t <= q:  # every target gets a distinct query
        return min(float(sum(cost[p[j], j] for j in range(t))) for p in itertools.permutations(range(q), t))
    return min(float(sum(cost[i, p[i]] for i in range(q))) for p in itertools.permutations(range(t), q))


# ------------------------------------------------------------------------------------------------ matcher


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("q", "t"), [(4, 3), (3, 4), (5, 5)])
def test_matcher_is_optimal(q, t, seed):
    g = torch.Generator().manual_seed(100 + seed)
    pred, tgt = rand_boxes(q, g), rand_boxes(t, g)
    cost = box_cost(pred, tgt)
    (p, j), = HungarianMatcher()(pred[None], [tgt])
    assert len(p) == min(q, t)
    assert len(set(p.tolist())) == len(p) and len(set(j.tolist())) == len(j)
    assert p.tolist() == sorted(p.tolist())
    assert matched_cost(cost, p, j) == pytest.approx(brute_force_min(cost), abs=1e-5)
    p1, j1 = match_one(pred, tgt)
    assert matched_cost(cost, p1, j1) == pytest.approx(brute_force_min(cost), abs=1e-5)


def test_box_cost_definition():
    g = torch.Generator().manual_seed(7)
    pred, tgt = rand_boxes(3, g), rand_boxes(2, g)
    cost = box_cost(pred, tgt, cost_bbox=3.0, cost_giou=0.5)
    for i in range(3):
        for j in range(2):
            l1 = float((pred[i] - tgt[j]).abs().sum())
            giou = float(generalized_box_iou(box_convert(pred[i : i + 1], "cxcywh", "xyxy"),
                                             box_convert(tgt[j : j + 1], "cxcywh", "xyxy"))[0, 0])
            assert float(cost[i, j]) == pytest.approx(3.0 * l1 - 0.5 * giou, abs=1e-5)


def test_batched_matcher_equals_per_image():
    g = torch.Generator().manual_seed(3)
    counts, q = [3, 0, 6, 1, 4], 5  # ragged, an empty image, and more targets than queries
    pred = rand_boxes(len(counts) * q, g).view(len(counts), q, 4)
    tgts = [rand_boxes(n, g) for n in counts]
    batched = HungarianMatcher()(pred, tgts)
    assert len(batched) == len(counts)
    for i, (p, j) in enumerate(batched):
        p1, j1 = match_one(pred[i], tgts[i])
        assert p.dtype == torch.long and j.dtype == torch.long
        assert torch.equal(p, p1) and torch.equal(j, j1)
        assert len(p) == min(q, counts[i])
    assert batched[1][0].numel() == 0 and batched[1][1].numel() == 0


def test_assign_blocks_solves_each_image_on_its_own_descriptions():
    """The criterion's path: one [B, Q, M] host cost block, each image solved on the columns of its descriptions."""
    cost = torch.tensor([[0.0, 5.0], [1.0, 0.5], [-2.0, 3.0]])
    block = np.zeros((2, 3, 3))
    block[0, :, :2] = cost.numpy()
    block[1, :, 2] = [4.0, -1.0, 2.0]
    block[0, :, 2] = block[1, :, :2] = -100.0  # another image's descriptions: never matched
    batch_idx, query_idx, desc_idx = assign_blocks(block, [np.array([0, 1]), np.array([2])])
    assert batch_idx.tolist() == [0, 0, 1] and query_idx.tolist() == [1, 2, 1] and desc_idx.tolist() == [1, 0, 2]
    p, j = torch.tensor(query_idx[:2]), torch.tensor(desc_idx[:2])
    assert matched_cost(cost, p, j) == pytest.approx(brute_force_min(cost))  # total 0.5 - 2.0 is the minimum


# ------------------------------------------------------------------------------------------------ criterion


def test_config_errors():
    with pytest.raises(ValueError, match="unknown mode"):
        GrainCriterion("detr", WEIGHTS)
    with pytest.raises(ValueError, match="loss_rd"):
        GrainCriterion("grain", {"loss_ic": 1.0, "loss_bbox": 1.0, "loss_giou": 1.0})
    GrainCriterion("clip", {"loss_ic": 1.0})  # only the mode's own weights are required


@pytest.mark.parametrize("mode", list(TRAIN_MODES))
@pytest.mark.parametrize("counts", [[0, 0, 0], [2, 0, 3]], ids=["no-descriptions", "some-images-empty"])
def test_empty_targets(mode, counts):
    outputs, targets = make_batch(counts, seed=11)
    leaves = as_leaves(outputs)
    crit = GrainCriterion(mode, WEIGHTS)
    total, logs = crit(leaves, targets)
    assert set(TRAIN_MODES[mode].losses) <= set(logs)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in logs.values())
    expected_total = sum(WEIGHTS[k] * logs[k] for k in TRAIN_MODES[mode].losses)
    assert torch.allclose(total, expected_total)
    if sum(counts) == 0:
        for k in ("loss_bbox", "loss_giou", "loss_rd"):
            if k in logs:
                assert logs[k].item() == 0.0
        for k in ("matched_giou", "rd_acc"):
            if k in logs:
                assert logs[k].item() == 0.0
    else:
        for k in ("loss_bbox", "loss_giou", "loss_rd"):
            if k in logs:
                assert logs[k].item() > 0.0
    total.backward()
    grads = [v.grad for v in leaves.values() if v.grad is not None]
    assert leaves["image_embed"].grad is not None
    assert all(torch.isfinite(gr).all() for gr in grads)


def test_loss_ic_equals_open_clip():
    from open_clip.loss import ClipLoss

    outputs, targets = make_batch([1, 0, 2, 1, 0, 1], seed=5, scale=14.3)
    _, logs = GrainCriterion("clip", WEIGHTS)(outputs, targets)
    ref = ClipLoss()(outputs["image_embed"], outputs["text_embed"], outputs["logit_scale"])
    assert torch.allclose(logs["loss_ic"], ref, atol=1e-6)
    logits = outputs["logit_scale"] * outputs["image_embed"] @ outputs["text_embed"].T
    assert logs["ic_acc"].item() == pytest.approx((logits.argmax(1) == torch.arange(6)).float().mean().item())


def test_box_losses_against_naive_loop():
    g = torch.Generator().manual_seed(21)
    counts, q = [3, 2], 4
    outputs, targets = make_batch(counts, q=q, seed=21)
    tgt = targets["desc_boxes"]
    # Known assignment: image 0's targets 0,1,2 sit next to queries 2,0,3; image 1's targets 3,4 next to queries 1,2.
    known = {(0, 2): 0, (0, 0): 1, (0, 3): 2, (1, 1): 3, (1, 2): 4}
    boxes = torch.tensor([[0.05, 0.05, 0.02, 0.02]]).repeat(2, q, 1)  # far-away, tiny boxes elsewhere
    for (b, qi), j in known.items():
        boxes[b, qi] = tgt[j] + 0.01 * (torch.rand(4, generator=g) - 0.5)
    outputs["boxes"] = boxes
    leaves = as_leaves(outputs)
    crit = GrainCriterion("no_rd", WEIGHTS)

    batch_idx, query_idx, desc_idx = crit.match(leaves, targets)
    assert {(b, qi): j for b, qi, j in zip(batch_idx.tolist(), query_idx.tolist(), desc_idx.tolist())} == known

    _, logs = crit(leaves, targets)
    naive_boxes = outputs["boxes"].clone().requires_grad_(True)
    l1 = giou_loss = 0.0
    for (b, qi), j in known.items():
        p, t = naive_boxes[b, qi], tgt[j]
        l1 = l1 + sum(abs(p[c] - t[c]) for c in range(4))
        xy_p, xy_t = box_convert(p[None], "cxcywh", "xyxy"), box_convert(t[None], "cxcywh", "xyxy")
        giou_loss = giou_loss + 1 - generalized_box_iou(xy_p, xy_t)[0, 0]
    n = len(known)
    assert torch.allclose(logs["loss_bbox"], l1 / n, atol=1e-6)
    assert torch.allclose(logs["loss_giou"], giou_loss / n, atol=1e-6)
    assert logs["num_boxes"].item() == n

    # gradients too
    (gl,) = torch.autograd.grad(logs["loss_bbox"] + 2 * logs["loss_giou"], leaves["boxes"])
    (gn,) = torch.autograd.grad(l1 / n + 2 * giou_loss / n, naive_boxes)
    assert torch.allclose(gl, gn, atol=1e-5)


def test_paired_giou_matches_torchvision():
    g = torch.Generator().manual_seed(9)
    a = box_convert(rand_boxes(6, g), "cxcywh", "xyxy")
    b = box_convert(rand_boxes(6, g), "cxcywh", "xyxy")
    assert torch.allclose(paired_giou(a, b), generalized_box_iou(a, b).diagonal(), atol=1e-6)


def naive_rd(queries: list[torch.Tensor], positives: list[int], allowed: list[list[int]], desc, scale) -> torch.Tensor:
    """mean over k of -log softmax_{j in allowed[k]}(scale * q_k . d_j)[positives[k]], one term at a time."""
    terms = []
    for qk, pk, cols in zip(queries, positives, allowed):
        logits = [scale * torch.dot(qk, desc[j]) for j in cols]
        log_denominator = torch.logsumexp(torch.stack(logits), dim=0)
        terms.append(log_denominator - scale * torch.dot(qk, desc[pk]))
    return torch.stack(terms).mean()


def test_loss_rd_against_naive_loop():
    outputs, targets = make_batch([3, 1, 0, 4], q=3, seed=31, scale=7.0)  # image 3: more descriptions than queries
    crit = GrainCriterion("grain", WEIGHTS)
    _, logs = crit(outputs, targets)
    batch_idx, query_idx, desc_idx = crit.match(outputs, targets)
    assert len(batch_idx) == 3 + 1 + 0 + 3
    m = outputs["desc_embed"].shape[0]
    queries = [outputs["region_embed"][b, qi] for b, qi in zip(batch_idx.tolist(), query_idx.tolist())]
    expected = naive_rd(queries, desc_idx.tolist(), [list(range(m))] * len(queries), outputs["desc_embed"], 7.0)
    assert torch.allclose(logs["loss_rd"], expected, atol=1e-5)


def test_loss_rd_clip_desc_masks_same_image_descriptions():
    outputs, targets = make_batch([3, 1, 0, 2], seed=41, scale=9.0)
    _, logs = GrainCriterion("clip_desc", WEIGHTS)(outputs, targets)
    img_of = targets["desc_image"].tolist()
    m = len(img_of)
    queries = [outputs["image_embed"][img_of[j]] for j in range(m)]
    allowed = [[j] + [k for k in range(m) if img_of[k] != img_of[j]] for j in range(m)]
    expected = naive_rd(queries, list(range(m)), allowed, outputs["desc_embed"], 9.0)
    assert torch.allclose(logs["loss_rd"], expected, atol=1e-5)
    unmasked = naive_rd(queries, list(range(m)), [list(range(m))] * m, outputs["desc_embed"], 9.0)
    assert not torch.allclose(logs["loss_rd"], unmasked, atol=1e-3)  # the mask matters


@pytest.mark.parametrize("mode", ["grain", "clip_desc"])
def test_loss_rd_per_rank_contrasts_each_block_with_its_own_descriptions(mode):
    """rd_negatives "rank" (the authors' per-GPU loss), ranks simulated by blocks of 2 images: each query's softmax
    holds only its block's descriptions, and the loss is the mean over blocks of each block's mean (naive loop)."""
    counts = [3, 1, 0, 4, 2, 2]
    outputs, targets = make_batch(counts, q=3, seed=47, scale=6.0)
    crit = GrainCriterion(mode, WEIGHTS, rd_negatives="rank", rd_rank_images=2)
    _, logs = crit(outputs, targets)
    img_of = targets["desc_image"].tolist()
    m = len(img_of)
    if mode == "grain":
        batch_idx, query_idx, desc_idx = crit.match(outputs, targets)
        rows = [(outputs["region_embed"][b, qi], p, b) for b, qi, p in zip(batch_idx.tolist(), query_idx.tolist(), desc_idx.tolist())]
    else:  # clip_desc also masks the other descriptions of the query's own image
        rows = [(outputs["image_embed"][img_of[j]], j, img_of[j]) for j in range(m)]
    per_block = {}
    for query, pos, image in rows:
        block = image // 2
        allowed = [k for k in range(m) if img_of[k] // 2 == block and (mode == "grain" or k == pos or img_of[k] != image)]
        assert len(allowed) < m  # fewer negatives than the global batch has
        per_block.setdefault(block, []).append(naive_rd([query], [pos], [allowed], outputs["desc_embed"], 6.0))
    expected = torch.stack([torch.stack(v).mean() for v in per_block.values()]).mean()
    assert len(per_block) == 3
    assert torch.allclose(logs["loss_rd"], expected, atol=1e-5), (float(logs["loss_rd"]), float(expected))
    _, global_logs = GrainCriterion(mode, WEIGHTS)(outputs, targets)
    assert not torch.allclose(logs["loss_rd"], global_logs["loss_rd"], atol=1e-3)  # the setting matters
    # a description of another block is not a negative: changing one of block 2 leaves the gradient that block 0's
    # queries (images 0 and 1) receive as it was, while with global negatives it changes
    leaf = "region_embed" if mode == "grain" else "image_embed"

    def block0_grad(c: GrainCriterion, desc: torch.Tensor) -> torch.Tensor:
        out = as_leaves({**outputs, "desc_embed": desc})
        c(out, targets, crit.match(outputs, targets) if mode == "grain" else None)[1]["loss_rd"].backward()
        return out[leaf].grad[:2].clone()

    changed = outputs["desc_embed"].clone()
    changed[m - 1] = -changed[m - 1]  # a description of image 5 (block 2)
    assert torch.allclose(block0_grad(crit, outputs["desc_embed"]), block0_grad(crit, changed), atol=1e-7)
    plain = GrainCriterion(mode, WEIGHTS)
    assert not torch.allclose(block0_grad(plain, outputs["desc_embed"]), block0_grad(plain, changed), atol=1e-5)
    # one block per process (rd_rank_images None) on one process: the global loss
    _, whole = GrainCriterion(mode, WEIGHTS, rd_negatives="rank")(outputs, targets)
    assert torch.allclose(whole["loss_rd"], global_logs["loss_rd"], atol=1e-6)
    with pytest.raises(ValueError, match="rd_negatives"):
        GrainCriterion(mode, WEIGHTS, rd_negatives="local")


def test_text_keys_equal_exactly_for_equal_rows():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 49408, (50, 32), generator=g)
    tokens[7] = tokens[3]
    tokens[20, -1] = tokens[21, -1] + 1
    keys = text_keys(tokens)
    for i in range(50):
        for j in range(50):
            assert (keys[i] == keys[j]) == torch.equal(tokens[i], tokens[j]), (i, j)


def test_loss_rd_masks_descriptions_with_the_positives_text():
    """mask_duplicates: another image's copy of the matched text is not a negative (naive loop reference)."""
    outputs, targets = make_batch([3, 2, 0, 3], q=3, seed=43, scale=8.0)
    m = outputs["desc_embed"].shape[0]
    keys = torch.tensor([10, 11, 12, 10, 13, 11, 10, 14])  # texts 10 and 11 repeat across images
    assert len(keys) == m
    targets = {**targets, "desc_key": keys}
    crit = GrainCriterion("grain", WEIGHTS, mask_duplicates=True)
    _, logs = crit(outputs, targets)
    batch_idx, query_idx, desc_idx = crit.match(outputs, targets)
    queries = [outputs["region_embed"][b, qi] for b, qi in zip(batch_idx.tolist(), query_idx.tolist())]
    allowed = [[p] + [k for k in range(m) if int(keys[k]) != int(keys[p])] for p in desc_idx.tolist()]
    expected = naive_rd(queries, desc_idx.tolist(), allowed, outputs["desc_embed"], 8.0)
    assert torch.allclose(logs["loss_rd"], expected, atol=1e-5)
    _, plain = GrainCriterion("grain", WEIGHTS)(outputs, targets)
    assert not torch.allclose(logs["loss_rd"], plain["loss_rd"], atol=1e-3)  # the mask matters
    with pytest.raises(KeyError, match="desc_key"):
        crit(outputs, {k: v for k, v in targets.items() if k != "desc_key"})


def test_no_box_matches_by_cosine():
    outputs, targets = make_batch([2, 3], q=4, seed=51)
    region = outputs["region_embed"].clone()
    # query perm[j] of each image is exactly description j's embedding → the -cos matching must recover it
    known = {(0, 3): 0, (0, 1): 1, (1, 0): 2, (1, 2): 3, (1, 3): 4}
    for (b, qi), j in known.items():
        region[b, qi] = outputs["desc_embed"][j]
    outputs["region_embed"] = region
    outputs.pop("boxes")  # not needed in no_box
    crit = GrainCriterion("no_box", WEIGHTS)
    batch_idx, query_idx, desc_idx = crit.match(outputs, targets)
    assert {(b, qi): j for b, qi, j in zip(batch_idx.tolist(), query_idx.tolist(), desc_idx.tolist())} == known
    total, logs = crit(outputs, targets)
    assert set(logs) == {"loss_ic", "loss_rd", "ic_acc", "rd_acc"} and torch.isfinite(total)


def test_centre_patches_and_selection_loss():
    """loss_sel's positives are the patches holding a box's centre (row-major, as the ViT orders its tokens); the
    focal loss pushes those scores up and every other score down, and is divided by the box count."""
    boxes = torch.tensor([[0.05, 0.05, 0.1, 0.1], [0.99, 0.30, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0], [1.0, 1.0, 0.1, 0.1]])
    assert centre_patches(boxes, 4).tolist() == [0, 1 * 4 + 3, 2 * 4 + 2, 15]
    logits = torch.zeros(2, 16, requires_grad=True)
    positives = (torch.tensor([0, 1, 1]), torch.tensor([0, 7, 7]))  # a patch holding two centres is one positive
    loss = selection_loss(logits, positives, torch.tensor(3.0))
    target = torch.zeros(2, 16)
    target[0, 0] = target[1, 7] = 1
    p = torch.full((2, 16), 0.5)
    ce = F.binary_cross_entropy(p, target, reduction="none")
    weight = torch.where(target == 1, 0.25, 0.75) * 0.5**2  # alpha_t * (1 - p_t)^gamma at p = 0.5
    assert torch.allclose(loss, (weight * ce).sum() / 3)
    loss.backward()
    grad = logits.grad
    assert grad[0, 0] < 0 and grad[1, 7] < 0 and (grad[0, 1:] > 0).all() and (grad[1, :7] > 0).all()


def test_selected_decoder_trains_its_patch_scores_in_every_decoder_mode():
    """With select_logits in the outputs, every decoder mode adds loss_sel (weight train.weights['loss_sel']): from
    the description boxes' centres, or in no_box (no box trained) from the patches of the matched queries."""
    outputs, targets = make_batch([2, 3], q=4, seed=5)
    outputs["select_logits"] = torch.zeros(2, 16)
    outputs["select_index"] = torch.tensor([[0, 5, 10, 15], [1, 2, 3, 4]])
    for mode in ("grain", "no_rd", "no_box"):
        leaves = as_leaves({k: v for k, v in outputs.items() if k != "select_index"})
        leaves["select_index"] = outputs["select_index"]
        crit = GrainCriterion(mode, {**WEIGHTS, "loss_sel": 0.3})
        total, logs = crit(leaves, targets)
        expected = sum(crit.weights[k] * logs[k] for k in TRAIN_MODES[mode].losses) + 0.3 * logs["loss_sel"]
        assert torch.allclose(total, expected) and logs["loss_sel"] > 0
        total.backward()
        positive = leaves["select_logits"].grad < 0
        if mode == "no_box":
            b, q, _ = crit.match(outputs, targets)
            want = torch.zeros(2, 16, dtype=torch.bool)
            want[b, outputs["select_index"][b, q]] = True
        else:
            want = torch.zeros(2, 16, dtype=torch.bool)
            want[targets["desc_image"], centre_patches(targets["desc_boxes"], 4)] = True
        assert torch.equal(positive, want), mode


def test_one_to_many_matching_matches_each_description_up_to_r_times():
    outputs, targets = make_batch([2, 3, 0], q=5, seed=8)
    one = GrainCriterion("grain", WEIGHTS)
    many = GrainCriterion("grain", WEIGHTS, match_repeats=2)
    _, _, d1 = one.match(outputs, targets)
    b2, q2, d2 = many.match(outputs, targets)
    assert sorted(d1.tolist()) == [0, 1, 2, 3, 4]
    # image 0: 2 descriptions x 2 <= 5 queries, each twice; image 1: 6 > 5 targets, 5 pairs, every description at least once
    assert sorted(d2[b2 == 0].tolist()) == [0, 0, 1, 1] and len(d2[b2 == 1]) == 5 and set(d2[b2 == 1].tolist()) == {2, 3, 4}
    assert len(set(zip(b2.tolist(), q2.tolist()))) == len(b2)  # a query still has one description
    assert many.num_pairs([2, 3, 0], 5) == len(b2) == 9
    total, logs = many(as_leaves(outputs), targets)
    assert torch.isfinite(total)
    with pytest.raises(ValueError, match="match_repeats"):
        GrainCriterion("grain", WEIGHTS, match_repeats=0)


# ------------------------------------------------------------------------------------------------ distributed

WORLD = 2
# Global batches (descriptions per image); rank 0 holds images [0, SPLIT), rank 1 the rest.
SPLIT = 2
SCENARIOS = [
    [3, 2, 1, 0, 2],  # rank 0: 5 descriptions, rank 1: 3 (one image without any)
    [2, 1, 0, 0, 0],  # rank 1: no description at all (but still takes part in every collective)
]


def _rank_slice(outputs: dict, targets: dict, rank: int) -> tuple[dict, dict, slice, slice]:
    """This rank's images and descriptions of a global batch (descriptions are ordered by image)."""
    b = outputs["image_embed"].shape[0]
    img = slice(0, SPLIT) if rank == 0 else slice(SPLIT, b)
    desc_image = targets["desc_image"]
    mask = (desc_image >= img.start) & (desc_image < img.stop)
    idx = mask.nonzero().squeeze(1)
    desc = slice(int(idx[0]), int(idx[-1]) + 1) if len(idx) else slice(0, 0)
    local_out = {k: (v if k == "logit_scale" else v[desc] if k == "desc_embed" else v[img]) for k, v in outputs.items()}
    local_tgt = {"desc_image": desc_image[desc] - img.start, "desc_boxes": targets["desc_boxes"][desc]}
    return local_out, local_tgt, img, desc


def _dist_worker(rank: int, init_method: str, data_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        results = []
        for outputs, targets in torch.load(data_path):
            local_out, local_tgt, _, _ = _rank_slice(outputs, targets, rank)
            leaves = as_leaves(local_out)
            total, logs = GrainCriterion("grain", WEIGHTS)(leaves, local_tgt)
            total.backward()
            results.append({
                "total": total.detach(),
                "logs": {k: v.detach() for k, v in logs.items()},
                "grads": {k: leaves[k].grad for k in (*LEAVES, "logit_scale")},
            })
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, timeout_s: float = 25.0) -> list:
    import torch.multiprocessing as mp

    data_path = tmp_path / "batches.pt"
    torch.save([make_batch(c, seed=61 + i) for i, c in enumerate(SCENARIOS)], data_path)
    init_method = f"file://{tmp_path / 'pg_init'}"
    ctx = mp.start_processes(_dist_worker, args=(init_method, str(data_path), str(tmp_path)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {timeout_s}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def test_distributed_equals_single_process(tmp_path):
    per_rank = _spawn(tmp_path)
    for s, counts in enumerate(SCENARIOS):
        outputs, targets = make_batch(counts, seed=61 + s)
        leaves = as_leaves(outputs)
        total, logs = GrainCriterion("grain", WEIGHTS)(leaves, targets)
        total.backward()
        ranks = [per_rank[r][s] for r in range(WORLD)]

        # (a) Loss values. loss_ic and loss_rd are computed on the gathered global batch: every rank's value equals
        # the single-process one. loss_bbox / loss_giou are local sums over num_boxes = N_global / W, so their
        # *average over ranks* (what DDP's gradient averaging optimises) equals the single-process loss; so does
        # the average of the weighted totals.
        for k in ("loss_ic", "loss_rd", "ic_acc", "rd_acc", "num_boxes", "matched_giou"):
            for r in range(WORLD):
                assert torch.allclose(ranks[r]["logs"][k], logs[k], atol=1e-5), (s, r, k)
        for k in ("loss_bbox", "loss_giou"):
            mean = sum(ranks[r]["logs"][k] for r in range(WORLD)) / WORLD
            assert torch.allclose(mean, logs[k], atol=1e-5), (s, k)
        assert torch.allclose(sum(x["total"] for x in ranks) / WORLD, total, atol=1e-5)

        # (b) Gradients. In real DDP every rank's local features come from the *shared* parameters and DDP
        # averages the parameter gradients over ranks. Emulate with a shared identity "parameter" per leaf: the
        # averaged gradient that reaches the slice held by rank r is grad_r / W (the other ranks contribute 0 to
        # it, since their graphs see this slice only as constants). Expected:
        #     grad_r(local leaf) / W == single-process grad(leaf)[slice of rank r]      (each rank, each leaf)
        # logit_scale is truly replicated (every rank uses it), so DDP gives the plain average:
        #     (1/W) * sum_r grad_r(logit_scale) == single-process grad(logit_scale)
        for r in range(WORLD):
            _, _, img, desc = _rank_slice(outputs, targets, r)
            for k in LEAVES:
                ref = leaves[k].grad[desc if k == "desc_embed" else img]
                got = ranks[r]["grads"][k] / WORLD
                assert got.shape == ref.shape, (s, r, k)
                assert torch.allclose(got, ref, atol=1e-5), (s, r, k, (got - ref).abs().max())
        mean_scale_grad = sum(x["grads"]["logit_scale"] for x in ranks) / WORLD
        assert torch.allclose(mean_scale_grad, leaves["logit_scale"].grad, atol=1e-5)
        assert not math.isclose(float(leaves["logit_scale"].grad), 0.0)
