"""The ground stage: reference boxes, and a tiny random OWLv2 (real classes, built locally) over Ray Data."""

from __future__ import annotations

import json

import pytest

from grain.annotate.describe import describe
from grain.annotate.ground import ground
from grain.stages import GROUND
from grain.config import DescribeConfig, GroundConfig, IngestConfig, RayConfig, SyntheticConfig
from grain.contracts import REGIONS_SCHEMA, check_table
from grain.data.ingest import ingest
from grain.shards import read_table

RAY = RayConfig(num_cpus=2, actor_num_cpus=0.5, batch_size=4, object_store_mb=256)


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    root = tmp_path_factory.mktemp("ground")
    ingest(IngestConfig(num_shards=3, synthetic=SyntheticConfig(num_images=12)), root / "samples")
    describe(DescribeConfig(engine="reference"), root / "samples", root / "descriptions")
    return root / "samples", root / "descriptions"


def test_reference_copies_ground_truth_boxes(annotated, tmp_path):
    samples, descriptions = annotated
    result = ground(GroundConfig(engine="reference"), samples, descriptions, tmp_path / "r")
    assert result.complete and result.totals["rows_out"] == 12
    table = read_table(tmp_path / "r")
    check_table(table, REGIONS_SCHEMA, "regions")
    truth = {r["uid"]: r["regions"] for r in read_table(samples).to_pylist()}
    for row in table.to_pylist():
        assert [(r["text"], r["box"]) for r in row["regions"]] == [(t["text"], t["box"]) for t in truth[row["uid"]]]
        assert all(r["score"] == 1.0 for r in row["regions"])
    marker = json.loads((tmp_path / "r" / "_done" / "part-00000.json").read_text())
    assert marker["descriptions_grounded"] == marker["descriptions"] > 0
    assert sum(marker["score_histogram"].values()) == marker["boxes"]
    assert not ground(GroundConfig(engine="reference"), samples, descriptions, tmp_path / "r").did_work


def test_fingerprint_ignores_how_it_runs(annotated):
    samples, descriptions = annotated
    base = GroundConfig(engine="owlv2", model="m")
    fp = GROUND.fingerprint_of(base, {"samples": samples, "descriptions": descriptions})
    assert GROUND.fingerprint_of(base.model_copy(update={"device": "cuda", "batch_size": 64}), {"samples": samples, "descriptions": descriptions}) == fp
    assert GROUND.fingerprint_of(base.model_copy(update={"threshold": 0.2}), {"samples": samples, "descriptions": descriptions}) != fp


def test_descriptions_must_come_from_these_samples(annotated, tmp_path):
    samples, descriptions = annotated
    ingest(IngestConfig(num_shards=2, synthetic=SyntheticConfig(num_images=8)), tmp_path / "other")
    with pytest.raises(ValueError, match="must come from these samples"):
        ground(GroundConfig(), tmp_path / "other", descriptions, tmp_path / "r")


# ------------------------------------------------------------------------------------------------ OWLv2 (tiny, real classes)


@pytest.fixture(scope="module")
def tiny_owl(tmp_path_factory):
    from support.tiny_owl import build_tiny_owlv2

    return build_tiny_owlv2(tmp_path_factory.mktemp("owl") / "random", seed=0)


@pytest.fixture(scope="module")
def pinned_owl(tmp_path_factory):
    """A tiny OWLv2 whose outputs are known: every real query scores sigmoid(2.0) on every patch, and patch
    p = row * 8 + col predicts the box cxcywh ((col + 1) / 8, (row + 1) / 8, 1/8, 1/8) in the padded square."""
    from support.tiny_owl import build_tiny_owlv2

    return build_tiny_owlv2(tmp_path_factory.mktemp("owl") / "pinned", seed=0, pin_score_logit=2.0)


def _png(width, height):
    from conftest import encode
    from PIL import Image

    return encode(Image.new("RGB", (width, height), (20, 160, 40)), "PNG")


@pytest.mark.parametrize("width, height", [(200, 70), (60, 140), (96, 96)])
def test_pinned_detector_boxes_land_in_the_original_frame(pinned_owl, width, height):
    from grain.annotate.ground import OwlDetector

    detector = OwlDetector(GroundConfig(engine="owlv2", model=str(pinned_owl), top_k_per_description=1))
    (result,) = detector.detect([{"image": _png(width, height), "descriptions": ["a red head"]}])
    (region,) = result["regions"]
    # All patches tie, so the stable sort keeps patch 0: cxcywh (1/8, 1/8, 1/8, 1/8) of the square of side
    # S = max(w, h), i.e. pixels [S/16, S/16, 3S/16, 3S/16], divided by the ORIGINAL width and height.
    side = max(width, height)
    expected = [side / 16 / width, side / 16 / height, 3 * side / 16 / width, 3 * side / 16 / height]
    assert region["box"] == pytest.approx(expected, abs=2e-3)
    assert region["score"] == pytest.approx(1 / (1 + 2.718281828459045 ** -2.0), abs=1e-5)


def test_threshold_topk_truncation_and_bad_rows(pinned_owl):
    from grain.annotate.ground import OwlDetector

    long_text = "a very long description of a striped tail " * 4
    rows = [
        {"image": _png(120, 80), "descriptions": ["a red head", long_text]},
        {"image": _png(50, 50), "descriptions": []},
        {"image": b"not an image", "descriptions": ["a red head"]},
    ]
    detector = OwlDetector(GroundConfig(engine="owlv2", model=str(pinned_owl), top_k_per_description=3, top_k_per_image=5))
    first, empty, broken = detector.detect(rows)
    assert len(first["regions"]) == 5 and first["grounded"] == 2 and first["truncated_queries"] == 1
    assert {r["text"] for r in first["regions"]} == {"a red head", long_text}  # the stored text stays whole
    assert empty == {"regions": [], "error": None, "descriptions": 0, "grounded": 0, "truncated_queries": 0}
    assert broken["regions"] == [] and "image cannot be decoded" in broken["error"]
    strict = OwlDetector(GroundConfig(engine="owlv2", model=str(pinned_owl), threshold=0.95))
    assert strict.detect(rows[:1])[0]["regions"] == []  # sigmoid(2) = 0.88 < 0.95


def test_owlv2_stage_end_to_end_over_ray(annotated, tiny_owl, tmp_path):
    samples, descriptions = annotated
    cfg = GroundConfig(engine="owlv2", model=str(tiny_owl), threshold=0.0, batch_size=3)
    result = ground(cfg, samples, descriptions, tmp_path / "r", ray_cfg=RAY)
    assert result.complete and result.totals["rows_out"] == 12
    table = read_table(tmp_path / "r")
    check_table(table, REGIONS_SCHEMA, "regions")
    described = {r["uid"]: r["descriptions"] for r in read_table(descriptions).to_pylist()}
    for row in table.to_pylist():
        assert row["error"] is None
        assert {r["text"] for r in row["regions"]} <= set(described[row["uid"]])
        assert 0 < len(row["regions"]) <= cfg.top_k_per_image
        for r in row["regions"]:
            x0, y0, x1, y1 = r["box"]
            assert 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1
    markers = [json.loads(p.read_text()) for p in sorted((tmp_path / "r" / "_done").glob("*.json"))]
    assert sum(m["boxes"] for m in markers) == sum(len(r["regions"]) for r in table.to_pylist())
    assert not ground(cfg, samples, descriptions, tmp_path / "r", ray_cfg=RAY).did_work


def test_batched_detector_equals_the_per_image_hf_loop(tiny_owl):
    """Ragged query lists in one batch (blank padding queries, a repeated and an over-long description, mixed image
    sizes) give each image exactly the inputs the processor builds and the boxes a one-image-at-a-time loop finds."""
    import numpy as np
    import torch
    from conftest import encode
    from PIL import Image
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    from grain.annotate.boxes import owl_to_original
    from grain.annotate.ground import OwlDetector

    rng = np.random.default_rng(0)
    long_text = "a very long description of a striped tail " * 4
    sizes = [(120, 80), (64, 150), (96, 96)]
    queries = [["a red head", "a blue wing", long_text], ["a blue wing"], ["a round eye", "a red head"]]
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    detector = OwlDetector(GroundConfig(engine="owlv2", model=str(tiny_owl), threshold=0.0, top_k_per_description=1))

    processor = Owlv2Processor.from_pretrained(tiny_owl)
    expected = processor(text=queries, images=images, return_tensors="pt", truncation=True)
    inputs, truncated = detector.inputs(images, queries)
    assert set(inputs) == set(expected)
    for key in expected:
        assert torch.equal(inputs[key], expected[key]), key
    assert truncated == [1, 0, 0]

    model = Owlv2ForObjectDetection.from_pretrained(tiny_owl).eval()
    rows = [{"image": encode(im, "PNG"), "descriptions": q} for im, q in zip(images, queries)]
    for image, texts, result in zip(images, queries, detector.detect(rows)):
        with torch.inference_mode():
            out = model(**processor(text=[texts], images=image, return_tensors="pt", truncation=True))
        scores = torch.sigmoid(out.logits[0]).numpy()
        best = {text: int(np.argmax(scores[:, q])) for q, text in enumerate(texts)}
        got = {r["text"]: r for r in result["regions"]}
        assert set(got) == set(texts) and result["truncated_queries"] == (long_text in texts)
        for q, text in enumerate(texts):
            assert got[text]["score"] == pytest.approx(float(scores[best[text], q]), abs=1e-5)
            box = owl_to_original(out.pred_boxes[0, best[text]].numpy(), *image.size, "unit_square")
            assert got[text]["box"] == pytest.approx([float(v) for v in box], abs=1e-5)
