"""Evaluation at ImageNet's scale: the project's own region scorers on random tensors of ImageNet's shapes.

    python bench/eval_scale.py                       # N 50,000 images, C 1,000 classes x D 8 descriptors, E 512,
                                                     # Q in 5, 16, 64, 196; one thread (~20 min on 2 cores)
    python bench/eval_scale.py --quick               # the CI smoke form: small shapes, seconds

For every Q and every scorer (``paper``, ``max``, ``bind``, and all three from one pass as evaluate runs them),
each in a fresh process with one thread: grain.evaluate.zeroshot.region_scores_all at the default working memory
(``evaluate.score_memory_mb``), on as many images as fit ``--seconds`` (all N when they do; otherwise the time is
extrapolated linearly in N, which the per-image cost is), its peak memory (the process's high-water mark above what
it held before scoring: the working set plus the [n, C] results; the [N, C] results at full N are added as
computed), against the implementation before the rewrite on the same images (kept below as the baseline: one
scorer per call, a [N, A, Q, S] masked copy for bind, the whole [N, Q, S] similarity for max). The region
embeddings themselves are float16 and memory-mapped from the cache file in a real run (N·Q·E·2 bytes on disk, read
chunk by chunk), listed apart. The global modes and the α sweep run at full N. Then the encoding's peak memory
per image: encode_images with a real (small) GRAIN model, buffers allocated once, against the previous
implementation and the result's own size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCORERS = ("paper", "max", "bind")
GIB = 2**30


def _rss(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # "5": reset the high-water mark to the current RSS
        fh.write("5")


def previous_scorer(scorer: str, regions: Any, boxes: Any, descs: list[Any], window: float = 1.0) -> Any:
    """The region scorers as they were before the single-pass rewrite (evaluate/zeroshot.py at 000bb11): the
    baseline this bench compares with."""
    import torch

    flat = torch.cat(descs)
    sizes = [d.shape[0] for d in descs]
    owners = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    n, q = regions.shape[:2]
    c = len(sizes)

    def pool(x: Any) -> Any:
        mean_over = torch.zeros(flat.shape[0], c)
        mean_over[torch.arange(flat.shape[0]), owners] = 1.0 / torch.tensor(sizes, dtype=torch.float32)[owners]
        return x @ mean_over

    if scorer == "paper":
        out = torch.empty(n, c)
        for s in range(0, n, 256):
            sim = regions[s : s + 256].float() @ flat.T
            best = torch.full((sim.shape[0], q, c), float("-inf")).scatter_reduce(2, owners.expand(sim.shape[0], q, -1), sim, reduce="amax")
            out[s : s + 256] = best.mean(dim=1)
        return out
    if scorer == "max":
        return pool((regions.float() @ flat.T).amax(dim=1))
    out = torch.empty(n, c)
    chunk = max(1, 2**25 // max(1, q * q * flat.shape[0]))
    for s in range(0, n, chunk):
        sim = regions[s : s + chunk].float() @ flat.T
        b = boxes[s : s + chunk].float()
        centres, extent = b[..., :2], window * b[..., 2:]
        near = ((centres[:, None, :, :] - centres[:, :, None, :]).abs() <= extent[:, :, None, :]).all(dim=-1)
        near |= torch.eye(q, dtype=torch.bool)
        masked = sim[:, None, :, :].masked_fill(~near[..., None], float("-inf"))
        out[s : s + chunk] = pool(masked.amax(dim=2)).amax(dim=1)
    return out


def _inputs(n: int, q: int, c: int, d: int, e: int, seed: int = 0) -> tuple[Any, Any, list[Any]]:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    regions = F.normalize(torch.randn(n, q, e, generator=g), dim=-1).half()
    boxes = torch.rand(n, q, 4, generator=g).half()
    descs = [F.normalize(torch.randn(d, e, generator=g), dim=-1) for _ in range(c)]
    return regions, boxes, descs


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    """One (Q, scorer, implementation) in this process: time and peak memory on up to N images."""
    import torch

    from grain.evaluate.zeroshot import region_scores_all

    torch.set_num_threads(1)
    q, scorer, impl = args.case_q, args.case_scorer, args.case_impl
    names = list(SCORERS) if scorer == "all" else [scorer]

    def score(regions: Any, boxes: Any, descs: list[Any]) -> None:
        if impl == "new":
            region_scores_all(regions, boxes, descs, names)
        else:
            for name in names:
                previous_scorer(name, regions, boxes, descs)

    probe = max(1, min(args.n, args.probe))
    regions, boxes, descs = _inputs(probe, q, args.classes, args.descriptors, args.dim)
    t0 = time.perf_counter()
    score(regions, boxes, descs)
    per_image = (time.perf_counter() - t0) / probe
    n = int(min(args.n, max(probe, args.seconds / max(per_image, 1e-9))))
    if impl == "previous":  # the baseline's working set grows with its chunk: never more images than the probe's x4
        n = min(n, 4 * probe)
    regions, boxes, descs = _inputs(n, q, args.classes, args.descriptors, args.dim, seed=1)
    before = _rss("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    score(regions, boxes, descs)
    seconds = time.perf_counter() - t0
    peak = _rss("VmHWM") - before
    results_full = 4 * args.n * args.classes * len(names)  # the [N, C] float32 results at full N
    results_run = 4 * n * args.classes * len(names)
    return {"q": q, "scorer": scorer, "impl": impl, "images": n, "seconds": seconds,
            "seconds_at_n": seconds * args.n / n, "extrapolated": n < args.n,
            "working_peak_bytes": max(0, peak - results_run), "peak_at_n_bytes": max(0, peak - results_run) + results_full,
            "input_bytes_at_n": 2 * args.n * q * args.dim + 2 * args.n * q * 4}


def run_global(args: argparse.Namespace) -> dict[str, Any]:
    """The global modes and the α sweep at full N: [N, E] x [C, E], five mixes with a region score, top-1/5."""
    import torch
    import torch.nn.functional as F

    from grain.evaluate.metrics import classification_metrics

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(2)
    image = F.normalize(torch.randn(args.n, args.dim, generator=g), dim=-1)
    classes = F.normalize(torch.randn(args.classes, args.dim, generator=g), dim=-1)
    region = torch.rand(args.n, args.classes, generator=g)
    labels = torch.randint(0, args.classes, (args.n,), generator=g)
    before = _rss("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    glob = image @ classes.T
    classification_metrics(glob, labels)
    t_global = time.perf_counter() - t0
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        classification_metrics(alpha * glob + (1 - alpha) * region, labels)
    return {"images": args.n, "global_seconds": t_global, "alpha_sweep_seconds": time.perf_counter() - t0 - t_global,
            "peak_bytes": _rss("VmHWM") - before}


def previous_encode(model: Any, count: int, load: Any, batch_size: int = 64) -> dict[str, Any]:
    """encode_images as it was before (evaluate/zeroshot.py at 000bb11): batches collected in lists of float32
    tensors and concatenated at the end — the baseline of the encoding measurement."""
    import numpy as np
    import torch

    from grain.train.data import load_image

    out: dict[str, list[Any]] = {"image_embed": [], "region_embed": [], "boxes": []}
    with torch.no_grad():
        for start in range(0, count, batch_size):
            arrays = [load_image(load(i), model.image_size, norm=model.image_norm) for i in range(start, min(count, start + batch_size))]
            enc = model.encode_image(torch.from_numpy(np.stack(arrays)))
            for k in out:
                out[k].append(enc[k].float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def run_encoding(args: argparse.Namespace) -> dict[str, Any]:
    """Encoding's peak memory with a real GRAIN model (grain-small with one region query per patch: Q = 144,
    D = 128): the process's high-water mark above what it held before, over ``--case-q`` images."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from grain.evaluate.zeroshot import encode_images
    from grain.train.model import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("grain-small", "grain", decoder={"query_type": "patches"}).eval()
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    count = args.case_q or args.encode_images  # --case-q carries the image count of this measurement
    before = _rss("VmRSS")
    _reset_peak()
    if args.case_impl == "new":
        emb = encode_images(model, count, lambda i: png, batch_size=64, region_dtype=torch.float16)
    else:
        emb = previous_encode(model, count, lambda i: png)
    peak = _rss("VmHWM") - before
    result = sum(t.numel() * t.element_size() for t in emb.values())
    return {"impl": args.case_impl, "queries": model.num_region_queries, "dim": model.arch["embed_dim"],
            "images": count, "peak_bytes": peak, "result_bytes_per_image": result / count}


def _child(kind: str, args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, "--n", str(args.n), "--classes", str(args.classes),
           "--descriptors", str(args.descriptors), "--dim", str(args.dim), "--seconds", str(args.seconds),
           "--probe", str(args.probe), "--encode-images", str(args.encode_images), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000, help="images (ImageNet's validation set: 50,000)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--descriptors", type=int, default=8, help="descriptors per class")
    ap.add_argument("--dim", type=int, default=512, help="embedding width E")
    ap.add_argument("--queries", default="5,16,64,196", help="region queries Q, comma-separated")
    ap.add_argument("--seconds", type=float, default=40.0, help="time per measurement; beyond it, extrapolate in N")
    ap.add_argument("--probe", type=int, default=64, help="images of the first, timing-probe pass")
    ap.add_argument("--encode-images", type=int, default=4096, help="images for the encoding memory measurement (and a quarter of them)")
    ap.add_argument("--quick", action="store_true", help="CI smoke form: small shapes")
    ap.add_argument("--out", default=None, help="results JSON")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--case-q", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--case-scorer", default="", help=argparse.SUPPRESS)
    ap.add_argument("--case-impl", default="new", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.classes, args.queries, args.seconds, args.probe, args.encode_images = 400, 50, "5,16", 1.0, 16, 256
    if args.child:
        result = {"case": run_case, "global": run_global, "encoding": run_encoding}[args.child](args)
        print(json.dumps(result))
        return 0

    t0 = time.perf_counter()
    queries = [int(x) for x in args.queries.split(",")]
    cases = []
    for q in queries:
        for scorer in (*SCORERS, "all"):
            for impl in ("new", "previous"):
                if impl == "previous" and scorer == "all":
                    continue
                r = _child("case", args, "--case-q", str(q), "--case-scorer", scorer, "--case-impl", impl)
                cases.append(r)
                print(f"Q {q:>3} {scorer:<5} {impl:<8}: {r['seconds_at_n']:8.1f} s at N{' (extrapolated from ' + str(r['images']) + ')' if r['extrapolated'] else ''}, "
                      f"working peak {_gib(r['working_peak_bytes'])} GiB", flush=True)
    glob = _child("global", args)
    counts = (args.encode_images // 4, args.encode_images)

    def encoding(impl: str) -> dict[str, Any]:
        """Peak growth per image between two image counts (the model's own working set cancels out)."""
        small, big = (_child("encoding", args, "--case-impl", impl, "--case-q", str(c)) for c in counts)
        return {**big, "images": list(counts), "peak_bytes": [small["peak_bytes"], big["peak_bytes"]],
                "peak_bytes_per_image": (big["peak_bytes"] - small["peak_bytes"]) / (counts[1] - counts[0])}

    enc, enc_prev = encoding("new"), encoding("previous")
    report = {"n": args.n, "classes": args.classes, "descriptors": args.descriptors, "dim": args.dim,
              "queries": queries, "seconds_budget": args.seconds, "threads": 1, "cases": cases, "global": glob,
              "encoding": enc, "encoding_previous": enc_prev, "wall_seconds": time.perf_counter() - t0, "quick": args.quick}
    lines = [f"N {args.n:,} images, C {args.classes:,} classes x D {args.descriptors} descriptors, E {args.dim}, one thread; "
             "time at N (extrapolated linearly from the images that fit the time budget where marked *), peak = working "
             "set + the [N, C] results; ratio = previous implementation / this one on the same images", "",
             "| Q | scorer | seconds at N | peak GiB | previous: seconds at N | previous: peak GiB on the images it ran | time ratio |",
             "|---|---|---|---|---|---|---|"]
    by = {(c["q"], c["scorer"], c["impl"]): c for c in cases}
    for q in queries:
        for scorer in (*SCORERS, "all"):
            new = by[(q, scorer, "new")]
            old = by.get((q, scorer, "previous"))
            star = "*" if new["extrapolated"] else ""
            cells = [f"{new['seconds_at_n']:.1f}{star}", _gib(new["peak_at_n_bytes"])]
            if old:
                cells += [f"{old['seconds_at_n']:.1f}{'*' if old['extrapolated'] else ''}", _gib(old["working_peak_bytes"]),
                          f"{old['seconds_at_n'] / new['seconds_at_n']:.2f}"]
            else:
                cells += ["—", "—", f"{sum(by[(q, s, 'new')]['seconds_at_n'] for s in SCORERS) / new['seconds_at_n']:.2f} (vs the three apart)"]
            lines.append(f"| {q} | {scorer} | " + " | ".join(cells) + " |")
    lines += ["", f"global modes at N: {glob['global_seconds']:.2f} s; α sweep (5 values): {glob['alpha_sweep_seconds']:.2f} s; "
              f"peak {_gib(glob['peak_bytes'])} GiB",
              f"encoding {counts[0]:,} vs {counts[1]:,} images (grain-small, Q {enc['queries']}, D {enc['dim']}): peak "
              f"{enc['peak_bytes_per_image'] / 1024:.1f} KiB per image (float16 regions, buffers allocated once; the result "
              f"itself {enc['result_bytes_per_image'] / 1024:.1f} KiB), previous implementation "
              f"{enc_prev['peak_bytes_per_image'] / 1024:.1f} KiB (float32 lists concatenated; its result "
              f"{enc_prev['result_bytes_per_image'] / 1024:.1f} KiB): ratio "
              f"{enc_prev['peak_bytes_per_image'] / enc['peak_bytes_per_image']:.2f}",
              f"region embeddings at N (float16, memory-mapped from the cache): "
              + ", ".join(f"Q {q}: {_gib(by[(q, 'all', 'new')]['input_bytes_at_n'])} GiB" for q in queries),
              f"wall {report['wall_seconds'] / 60:.1f} min"]
    print("\n".join(lines))
    report["table"] = lines
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
