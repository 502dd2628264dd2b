"""Benchmark: images/s of the ground stage (batched OWLv2 over Ray Data) vs a naive per-image Hugging Face loop.

Both run the same random OWLv2 (real classes, built locally; default a mid size: width 256, 4 layers, 384 px) on the same N synthetic images with the same
reference descriptions. The naive loop is what users write from the model card: one image at a time through
``Owlv2Processor`` + ``Owlv2ForObjectDetection`` + ``post_process_grounded_object_detection``.

The bench's settings are one PipelineConfig (workdir: a temp folder); its samples/ and descriptions/ (reference
engine) are written by the ingest and describe stages into the folders grain.stages.plan names, and the timed
``ground`` call reads those and writes the ground stage's planned regions/ folder.

    .venv/bin/python bench/ground_throughput.py --images 400
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from grain.annotate.ground import ground
from grain.annotate.streaming import local_ray_on_loopback
from grain.config import DescribeConfig, GroundConfig, IngestConfig, PipelineConfig, RayConfig, SyntheticConfig
from grain.shards import read_table
from grain.stages import pipeline_stages, plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harnesses (tests/support) are not installed
from support.tiny_owl import build_tiny_owlv2  # noqa: E402


def naive_loop(model_dir: Path, rows: list[dict], texts: dict[str, list[str]], threshold: float) -> float:
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    processor = Owlv2Processor.from_pretrained(model_dir)
    model = Owlv2ForObjectDetection.from_pretrained(model_dir).eval()
    t0 = time.perf_counter()
    for row in rows:
        image = Image.open(io.BytesIO(row["image"])).convert("RGB")
        queries = texts[row["uid"]]
        inputs = processor(text=[queries], images=image, return_tensors="pt", truncation=True)
        with torch.inference_mode():
            outputs = model(**inputs)
        side = max(image.size)
        processor.post_process_grounded_object_detection(outputs, threshold=threshold, target_sizes=[(side, side)], text_labels=[queries])
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256, help="random OWLv2 tower width (tiny test model: 32)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=384, help="detector input side (OWLv2-B/16: 960)")
    parser.add_argument("--cores", type=int, default=2, help="cores for the model: naive = torch threads, stage = actors x 1 thread")
    args = parser.parse_args()
    torch.set_num_threads(args.cores)
    work = Path(tempfile.mkdtemp(prefix="grain-bench-ground-"))
    try:
        model = build_tiny_owlv2(work / "owl", hidden=args.hidden, layers=args.layers, heads=4, image_size=args.image_size)
        cfg = PipelineConfig(
            workdir=str(work),
            ingest=IngestConfig(num_shards=4, synthetic=SyntheticConfig(num_images=args.images)),
            describe=DescribeConfig(engine="reference"),
            ground=GroundConfig(engine="owlv2", model=str(model), batch_size=args.batch_size),
            ray=RayConfig(actors=args.cores, actor_num_cpus=0.75, batch_size=32, calls_per_actor=1),
        )
        for name in pipeline_stages(cfg, "ground")[:-1]:  # ingest, describe: untimed preparation
            step = plan(cfg, name)
            step.stage.run(cfg, step.inputs, step.out)
        grounding = plan(cfg, "ground")
        samples, descriptions = grounding.inputs["samples"], grounding.inputs["descriptions"]
        rows = read_table(samples).to_pylist()
        texts = {r["uid"]: r["descriptions"] for r in read_table(descriptions).to_pylist()}

        naive_s = naive_loop(model, rows, texts, 0.3)

        import ray

        t0 = time.perf_counter()
        local_ray_on_loopback()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_start_s = time.perf_counter() - t0
        result = ground(cfg.ground, samples, descriptions, grounding.out, ray_cfg=cfg.ray)
        stage_s = time.perf_counter() - t0
        ray.shutdown()
        assert result.complete
        n = len(rows)
        print(f"OWLv2 random: width {args.hidden}, {args.layers} layers, {args.image_size} px")
        print(f"images={n} descriptions/image={sum(map(len, texts.values())) / n:.1f} detector batch={args.batch_size}")
        print(f"naive per-image HF loop: {naive_s:.1f} s = {n / naive_s:.1f} img/s")
        print(f"ground stage:            {stage_s:.1f} s = {n / stage_s:.1f} img/s (Ray start {ray_start_s:.1f} s)")
        print(f"stage img/s / naive img/s = {naive_s / stage_s:.2f}; Ray already running: {naive_s / (stage_s - ray_start_s):.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
