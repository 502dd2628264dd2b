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
    inputs = {"samples": samples, "descriptions": descriptions}
    base = GroundConfig(engine="owlv2", model="m", dtype="float32")
    fp = GROUND.fingerprint_of(base, inputs)
    assert GROUND.fingerprint_of(base.model_copy(update={"device": "cuda", "batch_size": 64, "gpus": 8}), inputs) == fp
    assert GROUND.fingerprint_of(base.model_copy(update={"threshold": 0.2}), inputs) != fp


def test_dtype_auto_is_bfloat16_on_cuda_and_float32_elsewhere(annotated):
    """``auto`` resolves per device, and the fingerprint holds the resolved dtype: auto on a CPU is the float32
    folder (CPU results and caches unchanged), auto on CUDA the bfloat16 one."""
    samples, descriptions = annotated
    inputs = {"samples": samples, "descriptions": descriptions}
    auto = GroundConfig(engine="owlv2", model="m")
    assert auto.dtype == "auto" and auto.resolved_dtype() == "float32"
    assert auto.model_copy(update={"device": "cuda"}).resolved_dtype() == "bfloat16"
    assert auto.model_copy(update={"device": "cuda:0"}).resolved_dtype() == "bfloat16"
    assert auto.model_copy(update={"device": "cuda", "dtype": "float16"}).resolved_dtype() == "float16"
    assert auto.model_copy(update={"device": "cuda", "dtype": "float32"}).resolved_dtype() == "float32"
    fp = lambda **update: GROUND.fingerprint_of(auto.model_copy(update=update), inputs)  # noqa: E731
    assert fp() == fp(dtype="float32") != fp(device="cuda") == fp(dtype="bfloat16")


def test_ground_batch_size_is_the_ray_batch_and_cuda_gets_one_actor_per_gpu():
    """The map_batches call the stage makes: Ray batches of ground.batch_size rows even when ray.batch_size is
    smaller (it used to cap them), and on CUDA one actor per GPU, one GPU each (no GPU needed: the dataset is a
    stand-in that records the call)."""
    from grain.annotate.ground import OwlActor, owl_engine, owl_pool

    class Recorder:
        def map_batches(self, fn, **kwargs):
            self.fn, self.kwargs = fn, kwargs
            return self

    ray_cfg = RayConfig(actors=3, batch_size=16, calls_per_actor=2)

    def pool(cfg: GroundConfig, cluster_gpus: float):
        ds = owl_engine(cfg, ray_cfg, cluster_gpus)(Recorder())
        strategy = ds.kwargs["compute"]
        return ds.fn, ds.kwargs, (strategy.min_size, strategy.max_size)

    fn, kwargs, size = pool(GroundConfig(engine="owlv2", device="cuda", batch_size=32), cluster_gpus=8)
    assert fn is OwlActor and kwargs["batch_size"] == 32 and kwargs["num_gpus"] == 1 and size == (8, 8)
    _, kwargs, size = pool(GroundConfig(engine="owlv2", device="cuda", batch_size=32, gpus=2), cluster_gpus=8)
    assert kwargs["num_gpus"] == 1 and size == (2, 2)
    _, kwargs, size = pool(GroundConfig(engine="owlv2", device="cpu", batch_size=4), cluster_gpus=8)
    assert kwargs["batch_size"] == 4 and "num_gpus" not in kwargs and size == (3, 3)  # CPU: ray.actors, no GPU
    with pytest.raises(ValueError, match=r"ground.device=cuda but the Ray cluster has no GPU.*ground.gpus"):
        owl_pool(GroundConfig(engine="owlv2", device="cuda"), ray_cfg, cluster_gpus=0)
    assert owl_pool(GroundConfig(engine="owlv2", device="cuda", gpus=4), ray_cfg, cluster_gpus=0)[0].actors == 4  # an autoscaler's


def test_a_numbered_cuda_device_is_refused_on_ray(annotated, tmp_path):
    samples, descriptions = annotated
    with pytest.raises(ValueError, match=r"ground.device=cuda:1: on Ray every ground actor is given a GPU of its own"):
        ground(GroundConfig(engine="owlv2", model="m", device="cuda:1"), samples, descriptions, tmp_path / "r")


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


def test_the_model_sees_ground_batch_size_images_per_forward(tiny_owl):
    """OwlActor (what each ground actor runs, here in-process) turns a Ray batch into forward passes of exactly
    ground.batch_size images; together with the map_batches call above, that is the batch the model sees."""
    import pyarrow as pa

    from grain.annotate.ground import OwlActor

    cfg = GroundConfig(engine="owlv2", model=str(tiny_owl), threshold=0.0, batch_size=4)
    actor = OwlActor(cfg.model_dump_json())
    seen = []
    actor.detector.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["pixel_values"].shape[0]), with_kwargs=True)
    rows = [{"uid": str(i), "path": "part-00000.parquet", "image": _png(40 + i, 30), "descriptions": ["a red head"]} for i in range(4)]
    out = actor(pa.Table.from_pylist(rows))
    assert seen == [4] and out["uid"] == ["0", "1", "2", "3"] and all(out["regions"])
    seen.clear()
    actor(pa.Table.from_pylist(rows * 2 + rows[:1]))  # larger than one forward batch: split, never merged
    assert seen == [4, 4, 1]


def _dtypes_seen(detector):
    """Record the output dtype of a vision-tower layer and of the two detection heads' first layers."""
    seen = {}
    model = detector.model
    for name, module in (("tower", model.owlv2.vision_model.encoder.layers[0].mlp.fc1),
                         ("box_head", model.box_head.dense0), ("class_head", model.class_head.dense0)):
        module.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out.dtype))
    return seen


def test_bfloat16_runs_the_towers_in_bf16_and_the_heads_and_boxes_in_float32(pinned_owl, tiny_owl):
    """dtype=bfloat16 (what auto gives on CUDA), checked on the CPU: autocast runs the towers in bfloat16 while the
    weights, the detection heads and the boxes stay float32. The pinned model's boxes are known in closed form:
    they come out exact (a model cast to bfloat16 was off by 3e-3), and a random model's scores stay
    within 0.03 of float32."""
    import numpy as np
    import torch
    from PIL import Image

    from grain.annotate.ground import OwlDetector

    bf16 = OwlDetector(GroundConfig(engine="owlv2", model=str(pinned_owl), dtype="bfloat16", top_k_per_description=64))
    fp32 = OwlDetector(GroundConfig(engine="owlv2", model=str(pinned_owl), top_k_per_description=64))
    assert fp32.dtype == "float32" and bf16.dtype == "bfloat16"
    assert {p.dtype for p in bf16.model.parameters()} == {torch.float32}
    seen = _dtypes_seen(bf16)
    rows = [{"image": _png(200, 70), "descriptions": ["a red head", "a blue wing"]}]
    (got,), (want,) = bf16.detect(rows), fp32.detect(rows)
    assert seen == {"tower": torch.bfloat16, "box_head": torch.float32, "class_head": torch.float32}
    assert [r["text"] for r in got["regions"]] == [r["text"] for r in want["regions"]]
    for g, w in zip(got["regions"], want["regions"]):
        assert g["box"] == pytest.approx(w["box"], abs=1e-6) and g["score"] == pytest.approx(w["score"], abs=1e-6)

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in [(120, 80), (64, 150)]]
    queries = [["a red head", "a blue wing"], ["a round eye"]]
    scores = {}
    for dtype in ("float32", "bfloat16"):
        det = OwlDetector(GroundConfig(engine="owlv2", model=str(tiny_owl), dtype=dtype))
        inputs, _ = det.inputs(images, queries)
        with torch.inference_mode(), det.autocast():
            scores[dtype] = torch.sigmoid(det.model(**inputs).logits.float()).numpy()
    assert np.abs(scores["bfloat16"] - scores["float32"]).max() < 0.03
