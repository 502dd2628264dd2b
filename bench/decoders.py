"""Benchmark: what each region decoder costs — training step time and FLOPs against our CLIP baseline.

Three GRAIN decoders on the science benchmark's towers (``grain-tiny`` at 96 px, patch 12: 64 patches; the
overrides of configs/bench/science.yaml), each against CLIP (ours) on the same batches:

  selected  16 region queries started from the 16 best-scoring patch tokens (``query_type: selected``; grain-tiny)
  patches   one region query per patch (64)
  paper     5 free learned queries, no key positions (grain-tiny-paper's decoder)

Step time: every contestant runs the training loop's own ``train_step`` (forward, loss with Hungarian matching,
backward, fused AdamW, LR schedule) on the SAME pre-built batches (TrainLoader over a synthetic world made by the
real ingest → reference describe → reference ground stages, in a temp workdir); warm-up steps, then ``--rounds``
rounds of ``--steps`` steps in rotating order, median per-step time. FLOPs: one real step per pre-built batch of
each contestant under grain.costs' FlopCounterMode (matmuls, convolutions and attention as the cost model counts
them; averaged over the batches). The two ratios per decoder: GRAIN / CLIP step time, and GRAIN / CLIP FLOPs per
step; issue 23's target is time ratio <= 1.15 x FLOP ratio (the decoder adds no cost beyond its arithmetic).

At paper size (``grain-vit-b16``, 224 px, 196 patches) the FLOP ratio of each decoder against CLIP is counted on the
meta device at grain.costs' defaults (batch 128, 5 descriptions per image, 77-token texts).

Writes ``--out`` (default docs/results/decoders.json), which ``grain bench science`` renders into docs/results.md
beside the accuracy of the benchmark's models with these decoders (``grain``, ``grain-patches``, ``grain-paper``).

    .venv/bin/python bench/decoders.py                 # ~1 min on 2 cores; run it on an otherwise idle machine
    .venv/bin/python bench/decoders.py --rounds 3 --steps 3 --no-paper-size   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ts  # noqa: E402  (the step-time machinery: world, batches, our contestants)

from grain import costs  # noqa: E402
from grain.config import TrainConfig  # noqa: E402
from grain.train.model import load_arch  # noqa: E402

#: the decoders compared: arch overrides on top of the science benchmark's towers
DECODERS: dict[str, dict[str, Any]] = {
    "selected": {"decoder": {"query_type": "selected", "num_region_queries": 16, "memory_pos": "sine"}},
    "patches": {"decoder": {"query_type": "patches", "memory_pos": "sine"}},
    "paper": {"decoder": {"query_type": "learned", "num_region_queries": 5, "memory_pos": "none"}},
}
#: the science benchmark's model that trains with each decoder (its accuracy goes beside the cost)
BENCH_MODEL = {"selected": "grain", "patches": "grain-patches", "paper": "grain-paper"}
#: the paper-size arch of each decoder (grain-vit-b16's towers)
PAPER_SIZE = {"selected": ("grain-vit-b16", None), "patches": ("grain-vit-b16", DECODERS["patches"]),
              "paper": ("grain-vit-b16-paper", None)}
TIME_OVER_FLOPS_TARGET = 1.15


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(a))
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def step_flops(contestant: ts.Contestant, n: int) -> float:
    """Mean FLOPs of ``n`` real steps (one per pre-built batch: the stream cycles through them)."""
    total = 0.0
    for _ in range(n):
        with costs._flop_counter() as counter:
            contestant.step()
        total += float(counter.get_total_flops())
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="grain-tiny")
    ap.add_argument("--image-size", type=int, default=96, help="the science benchmark's (arch override)")
    ap.add_argument("--patch-size", type=int, default=12, help="the science benchmark's (arch override)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-regions", type=int, default=9, help="descriptions per image (the benchmark's max_regions)")
    ap.add_argument("--batches", type=int, default=4, help="pre-built batches cycled through")
    ap.add_argument("--images", type=int, default=400, help="synthetic world size the batches are drawn from")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, as a training run)")
    ap.add_argument("--paper-size", action=argparse.BooleanOptionalAction, default=True,
                    help="also count the FLOP ratios at grain-vit-b16 size (meta device, ~1 min)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/decoders.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    device = torch.device("cpu")
    towers = {"vision_cfg": {"image_size": args.image_size, "patch_size": args.patch_size}}
    base = _merge(load_arch(args.arch), towers)
    cfg = TrainConfig(arch=args.arch, batch_size=args.batch_size, max_regions=args.max_regions)
    with tempfile.TemporaryDirectory(prefix="grain-decoders-") as tmp:
        world = ts.build_world(Path(tmp), args.images, args.image_size)
        batches = ts.take_batches(world, args.batches, args.batch_size, args.image_size,
                                  int(base["text_cfg"]["context_length"]), cfg)
    clip_batches = [ts.without_descriptions(b) for b in batches]
    descs = sum(int(b.desc_tokens.shape[0]) for b in batches) / len(batches)
    nocast = contextlib.nullcontext()
    contestants = {"clip": ts.ours("clip", base, cfg, clip_batches, device, nocast, False)}
    for name, over in DECODERS.items():
        c = ts.ours("grain", _merge(base, over), cfg, batches, device, nocast, False)
        contestants[name] = ts.Contestant(name, f"GRAIN ({name})", c.step, c.params)
    flops = {k: step_flops(c, len(batches)) for k, c in contestants.items()}
    for c in contestants.values():
        for _ in range(args.warmup):
            c.step()
    order = list(contestants)
    times: dict[str, list[float]] = {k: [] for k in order}
    for r in range(args.rounds):
        k = r % len(order)
        for key in order[k:] + order[:k]:
            gc.collect()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                contestants[key].step()
            times[key].append((time.perf_counter() - t0) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = {}
    for name in DECODERS:
        time_ratio, flop_ratio = med[name] / med["clip"], flops[name] / flops["clip"]
        rows[name] = {"queries": _queries(_merge(base, DECODERS[name])), "ms_per_step": 1e3 * med[name],
                      "ms_per_step_rounds": [1e3 * t for t in times[name]], "flops_per_step": flops[name],
                      "time_ratio": time_ratio, "flop_ratio": flop_ratio, "time_over_flops": time_ratio / flop_ratio,
                      "params": contestants[name].params, "bench_model": BENCH_MODEL[name]}
    paper = {}
    if args.paper_size:
        clip = costs.count_train_step_flops("grain-vit-b16", "clip")["flops_per_step"]
        for name, (arch, over) in PAPER_SIZE.items():
            a = _merge(load_arch(arch), over) if over else arch
            f = costs.count_train_step_flops(a, "grain")["flops_per_step"]
            paper[name] = {"arch": arch + (f" + {json.dumps(over)}" if over else ""), "flops_per_step": f,
                           "flop_ratio": f / clip, "queries": _queries(load_arch(arch) if not over else a)}
        paper["clip_flops_per_step"] = clip
    result = {
        "arch": args.arch, "towers": towers, "batch_size": args.batch_size, "max_regions": args.max_regions,
        "descriptions_per_batch": descs, "threads": torch.get_num_threads(), "rounds": args.rounds,
        "steps": args.steps, "warmup": args.warmup, "clip": {"ms_per_step": 1e3 * med["clip"],
        "ms_per_step_rounds": [1e3 * t for t in times["clip"]], "flops_per_step": flops["clip"],
        "params": contestants["clip"].params}, "decoders": rows, "paper_size": paper,
        "target_time_over_flops": TIME_OVER_FLOPS_TARGET, "seconds": time.perf_counter() - t_start,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": _machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{args.arch} + {towers}, batch {args.batch_size} ({descs:.0f} descriptions/batch), torch threads "
          f"{torch.get_num_threads()}, {args.rounds} rounds x {args.steps} steps, median")
    print(f"{'model':<18} {'queries':>7} {'ms/step':>8} {'GFLOP/step':>11} {'time ratio':>10} {'FLOP ratio':>10} {'time/FLOP':>9}")
    print(f"{'CLIP (ours)':<18} {'-':>7} {1e3 * med['clip']:>8.1f} {flops['clip'] / 1e9:>11.2f} {'1':>10} {'1':>10} {'':>9}")
    for name, r in rows.items():
        verdict = "ok" if r["time_over_flops"] <= TIME_OVER_FLOPS_TARGET else "over"
        print(f"{'GRAIN (' + name + ')':<18} {r['queries']:>7} {r['ms_per_step']:>8.1f} {r['flops_per_step'] / 1e9:>11.2f} "
              f"{r['time_ratio']:>10.2f} {r['flop_ratio']:>10.2f} {r['time_over_flops']:>8.2f} {verdict}")
    for name, r in paper.items():
        if isinstance(r, dict):
            print(f"paper size, {name}: {r['arch']} ({r['queries']} queries) GRAIN/CLIP FLOPs {r['flop_ratio']:.3f}")
    print(f"-> {args.out} ({result['seconds']:.0f} s)")


def _queries(arch: dict[str, Any]) -> int:
    dec, vis = arch["decoder"], arch["vision_cfg"]
    if dec.get("query_type") == "patches":
        return (vis["image_size"] // vis["patch_size"]) ** 2
    return int(dec["num_region_queries"])


def _machine() -> dict[str, Any]:
    from grain.evaluate.science import commit, machine

    return {**machine(), "commit": commit()}


if __name__ == "__main__":
    main()
