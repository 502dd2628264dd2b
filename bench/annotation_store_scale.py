"""The annotation store at scale: lookup cost per image and size per million annotations.

    python bench/annotation_store_scale.py                  # 10^6 stored describe replies
    python bench/annotation_store_scale.py --keys 100000 --json out.json

Fills a store with ``--keys`` describe replies in segments of ``--segment`` keys (the size describe's writer
flushes), replies shaped like a VLM's (a numbered list of short region descriptions, ~400 characters), then, in a
fresh process state (a new AnnotationStore, as a new run would), measures: building the index; looking up
batches of ``--batch`` keys (a shard's worth) that are all stored, none stored, and half stored; and the store's
size on disk. Prints per-image costs beside the VLM time they save, and writes every number with --json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("red", "small", "round", "striped", "wooden", "metal", "left", "right", "upper", "lower", "curved", "bright",
         "dark", "wing", "beak", "wheel", "handle", "leaf", "window", "door", "tail", "eye", "patch", "edge")


def reply(rng: random.Random) -> dict:
    lines = [f"{i + 1}. " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) for i in range(rng.randint(5, 9))]
    return {"text": "\n".join(lines), "prompt_tokens": rng.randint(280, 320), "completion_tokens": rng.randint(60, 110)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--root", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="grain-store-scale-") as tmp:
        return run(args, Path(args.root or tmp))


def run(args: argparse.Namespace, root: Path) -> int:
    from grain.annotate.store import AnnotationStore, content_key

    settings = {"engine": "openai", "model": "bench", "prompt_id": "describe@bench"}
    rng = random.Random(0)
    keys = [content_key("describe", str(i)) for i in range(args.keys)]
    t0 = time.perf_counter()
    writer = AnnotationStore(root, "describe", settings)
    for start in range(0, args.keys, args.segment):
        writer.put_many({k: reply(rng) for k in keys[start : start + args.segment]})
    write_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in (root / "describe").rglob("*") if p.is_file())

    t0 = time.perf_counter()
    store = AnnotationStore(root, "describe", settings)
    stored = len(store)  # builds the index
    index_s = time.perf_counter() - t0

    def timed(batch: list[str]) -> float:
        store._tables.clear()  # noqa: SLF001 - each batch starts with nothing read, as a new shard would
        store._files.clear()  # noqa: SLF001
        t = time.perf_counter()
        store.get_many(batch)
        return (time.perf_counter() - t) / len(batch)

    missing = [content_key("describe", f"missing {i}") for i in range(args.batch * args.batches)]
    hit = [timed(rng.sample(keys, args.batch)) for _ in range(args.batches)]
    miss = [timed(missing[i * args.batch : (i + 1) * args.batch]) for i in range(args.batches)]
    half = [timed(rng.sample(keys, args.batch // 2) + missing[i * args.batch : i * args.batch + args.batch // 2])
            for i in range(args.batches)]
    out = {"keys": stored, "segment_keys": args.segment, "segments": -(-args.keys // args.segment),
           "write_seconds": round(write_s, 1), "bytes": size, "bytes_per_key": round(size / stored, 1),
           "mb_per_million": round(size / stored * 1e6 / 1e6, 1), "index_build_seconds": round(index_s, 2),
           "lookup_us_per_image": {"all stored": round(statistics.median(hit) * 1e6, 1),
                                   "none stored": round(statistics.median(miss) * 1e6, 1),
                                   "half stored": round(statistics.median(half) * 1e6, 1)}}
    print(f"store of {stored:,} describe replies in {out['segments']:,} segments of {args.segment}: "
          f"{size / 1e6:.0f} MB on disk ({out['bytes_per_key']:.0f} B a reply, {out['mb_per_million']:.0f} MB per million); "
          f"written in {write_s:.0f} s; index built in {index_s:.2f} s")
    for name, us in out["lookup_us_per_image"].items():
        print(f"  lookup, batches of {args.batch} keys, {name}: {us:.1f} us per image (median of {args.batches})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
