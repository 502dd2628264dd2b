"""Region scorers (paper / max / bind), the class-name-free descriptors mode and the swap task, on hand-built
embeddings where the right answer is known, against naive loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grain.config import EvalConfig
from grain.evaluate.run import _pair_accuracy, swap_task
from grain.evaluate.descriptors import composed_sentence
from grain.evaluate.zeroshot import (
    bound_region_scores,
    pooled_logits,
    raw_descriptor_embeddings,
    region_scores,
    score_regions,
)


def _naive_paper(regions, classes):
    out = torch.zeros(regions.shape[0], len(classes))
    for i in range(regions.shape[0]):
        for c, d in enumerate(classes):
            out[i, c] = sum(max(float(q @ e) for e in d) for q in regions[i]) / regions.shape[1]
    return out


def _naive_bind(regions, boxes, classes, window, pool="mean"):
    n, q = regions.shape[:2]
    out = torch.zeros(n, len(classes))
    for i in range(n):
        for c, d in enumerate(classes):
            best = -9.0
            for a in range(q):
                near = [j for j in range(q) if j == a or bool(((boxes[i, j, :2] - boxes[i, a, :2]).abs()
                                                               <= window * boxes[i, a, 2:]).all())]
                per = [max(float(regions[i, j] @ e) for j in near) for e in d]
                score = sum(per) / len(d) if pool == "mean" else max(per)
                best = max(best, score)
            out[i, c] = best
    return out


def _random_case(seed=0, n=5, q=7, d=8, classes=(3, 1, 4)):
    g = torch.Generator().manual_seed(seed)
    regions = F.normalize(torch.randn(n, q, d, generator=g), dim=-1)
    boxes = torch.rand(n, q, 4, generator=g)
    descs = [F.normalize(torch.randn(k, d, generator=g), dim=-1) for k in classes]
    return regions, boxes, descs


def test_scorers_equal_naive_loops():
    regions, boxes, descs = _random_case()
    assert torch.allclose(region_scores(regions, descs), _naive_paper(regions, descs), atol=1e-6)
    for window in (0.2, 0.5, 1.0):
        got = bound_region_scores(regions, boxes, descs, window, budget=50)  # tiny budget: several chunks
        assert torch.allclose(got, _naive_bind(regions, boxes, descs, window), atol=1e-6)
    # a window covering the image, and no boxes, are the `max` scorer
    full = _naive_bind(regions, boxes, descs, 1e6)
    assert torch.allclose(bound_region_scores(regions, boxes, descs, 1e6), full, atol=1e-6)
    assert torch.allclose(score_regions("max", regions, boxes, descs), full, atol=1e-6)


def _previous_scorers(regions, boxes, descs, window, pool):
    """The scorers as they were before the single-pass rewrite (one scorer per call, a dense [N,A,Q,S] mask and a
    dense averaging matmul), kept as the reference the rewrite must equal."""
    flat = torch.cat(descs)
    sizes = [d.shape[0] for d in descs]
    owners = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    q = regions.shape[1]

    def pool_(x):
        if pool == "mean":
            mean_over = torch.zeros(flat.shape[0], len(sizes))
            mean_over[torch.arange(flat.shape[0]), owners] = 1.0 / torch.tensor(sizes, dtype=torch.float32)[owners]
            return x @ mean_over
        return torch.full((*x.shape[:-1], len(sizes)), float("-inf")).scatter_reduce(-1, owners.expand(*x.shape[:-1], -1), x, reduce="amax")

    sim = regions @ flat.T
    best = torch.full((*sim.shape[:2], len(sizes)), float("-inf")).scatter_reduce(2, owners.expand(*sim.shape[:2], -1), sim, reduce="amax")
    centres, extent = boxes[..., :2], window * boxes[..., 2:]
    near = ((centres[:, None] - centres[:, :, None]).abs() <= extent[:, :, None]).all(-1) | torch.eye(q, dtype=torch.bool)
    masked = sim[:, None].masked_fill(~near[..., None], float("-inf"))
    return {"paper": best.mean(1), "max": pool_(sim.amax(1)), "bind": pool_(masked.amax(2)).amax(1)}


@pytest.mark.parametrize("pool", ["mean", "max"])
@pytest.mark.parametrize("seed,q,classes", [(5, 5, (8, 8, 7, 9)), (6, 16, (1, 3, 12)), (7, 33, (2, 2, 2, 2, 2))])
def test_single_pass_scorers_equal_the_previous_implementation_at_any_budget(pool, seed, q, classes):
    """region_scores_all: every scorer from one similarity pass equals the previous per-scorer implementation to
    1e-6, whatever the working-memory budget (one image and one anchor per block, or everything at once)."""
    from grain.evaluate.zeroshot import _chunking, region_scores_all

    regions, boxes, descs = _random_case(seed=seed, n=9, q=q, d=16, classes=classes)
    want = _previous_scorers(regions, boxes, descs, 0.4, pool)
    s = sum(classes)
    for budget in (1, 4 * q * s + 8 * s, 3 * 4 * q * s, 2**30):
        got = region_scores_all(regions, boxes, descs, ("bind", "max", "paper"), 0.4, pool, budget)
        for k in want:
            assert torch.allclose(got[k], want[k], atol=1e-6), (k, budget, float((got[k] - want[k]).abs().max()))
    assert _chunking(q, s, ["bind"], 1) == (1, 1)  # the smallest budget: one image, one anchor at a time
    assert _chunking(q, s, ["max", "paper"], 2**30)[0] > 9
    with pytest.raises(ValueError, match="needs the region queries' boxes"):
        region_scores_all(regions, None, descs, ("bind",))
    with pytest.raises(ValueError, match="unknown region scorer"):
        region_scores_all(regions, boxes, descs, ("best",))


def test_max_pool_scores_a_class_by_its_best_descriptor():
    """descriptor_pool max (descriptors that are alternatives): every scorer and the global modes take the best
    descriptor of a class instead of the mean."""
    regions, boxes, descs = _random_case(seed=3)
    for window in (0.3, 1.0):
        got = bound_region_scores(regions, boxes, descs, window, budget=50, pool="max")
        assert torch.allclose(got, _naive_bind(regions, boxes, descs, window, "max"), atol=1e-6)
    assert torch.allclose(score_regions("max", regions, boxes, descs, pool="max"),
                          _naive_bind(regions, boxes, descs, 1e6, "max"), atol=1e-6)
    image = regions[:, 0]
    want = torch.stack([torch.stack([(image[i] @ d.T).max() for d in descs]) for i in range(image.shape[0])])
    assert torch.allclose(pooled_logits(image, descs, "max"), want, atol=1e-6)
    mean = torch.stack([torch.stack([(image[i] @ d.T).mean() for d in descs]) for i in range(image.shape[0])])
    assert torch.allclose(pooled_logits(image, descs, "mean"), mean, atol=1e-6)


def test_composed_sentence_joins_descriptors_without_the_class_name():
    assert composed_sentence(["an orange head", "a yellow striped body.", " a blue tail "]) == \
        "an orange head, a yellow striped body and a blue tail."
    assert composed_sentence(["a red head", ""]) == "a red head."
    with pytest.raises(ValueError, match="non-blank"):
        composed_sentence([" ", "."])


def test_bind_needs_all_descriptions_on_one_object_and_max_does_not():
    # Object A on the left shows descriptions 0, 1, 2; object B on the right shows 3, 4, 5 (one-hot embeddings).
    e = torch.eye(6)
    regions = torch.stack([e[0], e[1], e[2], e[3], e[4], e[5]]).unsqueeze(0)  # [1, 6 queries, 6]
    centres = torch.tensor([[0.2, 0.5], [0.25, 0.45], [0.15, 0.55], [0.8, 0.5], [0.75, 0.55], [0.85, 0.45]])
    boxes = torch.cat([centres, torch.full((6, 2), 0.1)], dim=1).unsqueeze(0)  # windows reach ±0.1
    truth = e[[0, 1, 2]]  # all on A
    foil = e[[0, 1, 4]]   # two on A, one on B: every description is *somewhere* in the image
    classes = [truth, foil]
    maxed = score_regions("max", regions, boxes, classes)[0]
    bound = score_regions("bind", regions, boxes, classes, 1.0)[0]
    assert maxed[0] == maxed[1] == 1.0  # max cannot tell them apart
    assert bound[0] == 1.0 and abs(float(bound[1]) - 2 / 3) < 1e-6  # bind can
    assert score_regions("paper", regions, boxes, classes).shape == (1, 2)


def test_descriptors_mode_is_the_normalised_mean_of_raw_descriptors():
    table = {"a red head": torch.tensor([1.0, 0.0]), "a blue body": torch.tensor([0.0, 1.0]),
             "a white tail": torch.tensor([0.6, 0.8])}

    def text(texts):
        return torch.stack([table[t] for t in texts])

    got = raw_descriptor_embeddings(text, [["a red head", "a blue body"], ["a white tail"]])
    assert torch.allclose(got, torch.tensor([[2 ** -0.5, 2 ** -0.5], [0.6, 0.8]]), atol=1e-6)


def test_swap_task_counts_wins_and_half_ties():
    assert _pair_accuracy(torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])) == {"acc": 0.5, "n": 3}
    e = torch.eye(3)
    words = {"t": e[0], "f": e[1], "x": e[2], "t.": e[0], "f.": e[1]}  # "t." / "f.": the composed sentences

    def text(texts):
        return torch.stack([words[t] for t in texts])

    # image 0's global embedding is the truth, image 1's the foil
    emb = {"image_embed": torch.stack([e[0], e[1]]), "region_embed": torch.stack([e[[0, 2]], e[[1, 2]]]),
           "boxes": torch.full((2, 2, 4), 0.5)}
    pairs = [(["t"], ["f"]), (["t"], ["f"])]
    out = swap_task(EvalConfig(), text, emb, pairs)
    assert out[("swap", "descriptors")]["acc"] == 0.5 and out[("swap", "composed")]["acc"] == 0.5
    for scorer in ("bind", "max"):
        assert out[("swap", f"regions-{scorer}@0")] == {"acc": 0.5, "n": 2}


def test_template_ensemble_and_unnormalised_class_means_as_the_authors_score():
    """evaluate.template_set paper46 + description_templates all: a class's global embedding averages every
    template × every descriptor sentence (46 × D strings encoded); renormalize false keeps that mean's length, which
    changes the ranking whenever classes' prompts disagree by different amounts. Labels are made the un-normalised
    scorer's own answers, so it scores 100 % and the re-normalised one must not."""
    import zlib
    from types import SimpleNamespace

    from grain.evaluate.descriptors import PAPER_TEMPLATES, descriptor_sentence
    from grain.evaluate.run import score_dataset

    dim = 8

    def vec(t: str) -> torch.Tensor:
        return F.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))), dim=0)

    requested: list[str] = []

    def text(texts):
        requested.extend(texts)
        return torch.stack([vec(t) for t in texts]) if texts else torch.zeros(0, dim)

    classes = ["wug", "blick", "dax"]
    descriptors = {"wug": ["a red head"], "blick": ["a blue tail", "long legs", "a green beak", "small eyes"],
                   "dax": ["a white body", "a black wing"]}
    image = F.normalize(torch.randn(300, dim, generator=torch.Generator().manual_seed(3)), dim=-1)

    def expected(templates: list[str], renormalize: bool) -> torch.Tensor:
        rows = []
        for c in classes:
            m = torch.stack([vec(descriptor_sentence(c, d, t)) for d in descriptors[c] for t in templates]).mean(0)
            rows.append(F.normalize(m, dim=0) if renormalize else m)
        return image @ torch.stack(rows).T

    authors = expected(list(PAPER_TEMPLATES), renormalize=False)
    labels = authors.argmax(dim=1)
    data = SimpleNamespace(classnames=classes, templates=["a photo of a {c}."], labels=labels.tolist(), descriptor_pool="mean")

    def top1(**settings) -> float:
        requested.clear()
        cfg = EvalConfig(modes=["names", "descriptions"], **settings)
        out = score_dataset(cfg, SimpleNamespace(mode="clip"), text, data, {"image_embed": image}, descriptors)
        return out[("classification", "descriptions")]["acc1"]

    assert top1(template_set="paper46", description_templates="all", renormalize=False) == 1.0
    sentences = {descriptor_sentence(c, d, t) for c in classes for d in descriptors[c] for t in PAPER_TEMPLATES}
    assert len(sentences) == 46 * 7 and sentences <= set(requested)
    renormalised = top1(template_set="paper46", description_templates="all", renormalize=True)
    assert renormalised < 1.0
    assert abs(renormalised - float((expected(list(PAPER_TEMPLATES), True).argmax(1) == labels).double().mean())) < 1e-9
    # grain's default: DCLIP's one template, the dataset's own; no template of the 46 is encoded
    top1()
    named = {t for t in requested if any(c in t for c in classes)}
    assert named == {f"a photo of a {c}." for c in classes} | {descriptor_sentence(c, d) for c in classes for d in descriptors[c]}
    assert len(PAPER_TEMPLATES) == len(set(PAPER_TEMPLATES)) == 46 and all("{c}" in t for t in PAPER_TEMPLATES)
    assert not any("bird" in t for t in PAPER_TEMPLATES)


def test_eval_scale_bench_quick_form(tmp_path):
    """bench/eval_scale.py --quick (the CI smoke form of the ImageNet-scale measurement): every scorer at every Q
    in both implementations, the global modes and the encoding measurement run and land in the JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "scale.json"
    bench = Path(__file__).resolve().parents[1] / "bench" / "eval_scale.py"
    done = subprocess.run([sys.executable, str(bench), "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    got = {(c["q"], c["scorer"], c["impl"]) for c in report["cases"]}
    for q in (5, 16):
        for scorer in ("paper", "max", "bind"):
            assert {(q, scorer, "new"), (q, scorer, "previous")} <= got
        assert (q, "all", "new") in got
    assert all(c["seconds_at_n"] > 0 and c["images"] >= 1 for c in report["cases"])
    assert report["encoding"]["result_bytes_per_image"] > 0 and "| 16 | bind |" in done.stdout
