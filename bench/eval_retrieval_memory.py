"""Benchmark: peak memory and wall time of chunked ``retrieval_metrics`` vs one big score matrix + topk.

Data: seeded random embeddings, COCO-Karpathy-test sized by default — 5000 images × 5 captions each (25000 texts),
D = 512. Images are unit vectors drawn uniformly; each caption is its image plus Gaussian noise (``--noise`` = the
noise vector's expected norm relative to the image's), renormalised, so recall@k is far from both 0 and 1. The
parent process generates the data once and saves it as ``.npy``; every method then runs in its OWN fresh subprocess
(``ru_maxrss`` is a per-process high-water mark, so peaks of two methods in one process would mix). A worker:

1. loads the embeddings (``torch.from_numpy``, no copy) and warms up by running its method once on a 16-image
   slice (so lazily loaded kernel code and thread pools are resident before the measurement);
2. notes its current RSS (``/proc/self/statm``);
3. runs the method once, timed with ``time.perf_counter``;
4. reports ``ru_maxrss`` (``resource.getrusage(RUSAGE_SELF)``) and the growth = peak − RSS before the call.

Methods:

* ``chunked``: ``grain.evaluate.metrics.retrieval_metrics(..., chunk=--chunk)`` (peak extra ~ chunk × max(N, M)
  float32 + masks);
* ``full``: the plain way — the whole ``[M, N]`` float32 score matrix ``text @ image.T``, then ``topk`` along each
  axis (text → image: is the text's image in its top-k; image → text: is any of the image's captions in its
  top-k), as CLIP_benchmark's retrieval does (written here, not copied).

Both must give identical metric dicts (the script exits 1 otherwise).

    .venv/bin/python bench/eval_retrieval_memory.py
    .venv/bin/python bench/eval_retrieval_memory.py --images 1000 --captions-per-image 5 --dim 256 --chunk 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from grain.evaluate.metrics import retrieval_metrics

KS = (1, 5, 10)
MIB = 1024 * 1024


# ------------------------------------------------------------------------------------------------ data


def make_data(n_images: int, per_image: int, dim: int, noise: float, seed: int):
    """Returns ``image_emb [N, D]``, ``text_emb [N*per_image, D]`` (float32, unit rows), ``text_image [M]`` int64."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g), dim=1)
    text_image = torch.arange(n_images).repeat_interleave(per_image)  # Karpathy order: captions grouped by image
    txt = img[text_image] + noise * torch.randn(len(text_image), dim, generator=g) / dim**0.5
    txt = torch.nn.functional.normalize(txt, dim=1)
    return img.numpy(), txt.numpy(), text_image.numpy()


# ------------------------------------------------------------------------------------------------ methods


def full_matrix_metrics(img: torch.Tensor, txt: torch.Tensor, text_image: torch.Tensor, ks=KS) -> dict:
    """One ``[M, N]`` score matrix, then topk per text (over images) and per image (over texts)."""
    n, m = img.shape[0], txt.shape[0]
    scores = txt @ img.t()  # [M, N] — the whole matrix
    kmax = max(ks)
    t2i = scores.topk(min(kmax, n), dim=1).indices  # [M, k] image indices
    i2t = scores.t().topk(min(kmax, m), dim=1).indices  # [N, k] text indices
    owner_of_top = text_image[i2t]  # [N, k] image of each retrieved text
    mine = torch.arange(n)[:, None]
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float((t2i[:, :k] == text_image[:, None]).any(1).double().mean())
    for k in ks:
        out[f"text_retrieval_recall@{k}"] = float((owner_of_top[:, :k] == mine).any(1).double().mean())
    out["n_images"] = n
    out["n_texts"] = m
    return out


def chunked_metrics(img: torch.Tensor, txt: torch.Tensor, text_image: torch.Tensor, chunk: int, ks=KS) -> dict:
    return retrieval_metrics(img, txt, text_image, ks=ks, chunk=chunk)


# ------------------------------------------------------------------------------------------------ worker


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(method: str, data_dir: Path, chunk: int) -> None:
    img = torch.from_numpy(np.load(data_dir / "image_emb.npy"))
    txt = torch.from_numpy(np.load(data_dir / "text_emb.npy"))
    text_image = torch.from_numpy(np.load(data_dir / "text_image.npy"))
    run = (lambda i, t, o: full_matrix_metrics(i, t, o)) if method == "full" else \
        (lambda i, t, o: chunked_metrics(i, t, o, chunk))
    # warm-up on a tiny slice (the first 16 images and their captions), so the code pages and thread pools of
    # every kernel the method uses are already resident before the measured call
    small = text_image < 16
    run(img[:16].clone(), txt[small].clone(), text_image[small].clone())
    rss_before = current_rss_bytes()
    peak_before = max_rss_bytes()
    t0 = time.perf_counter()
    metrics = run(img, txt, text_image)
    seconds = time.perf_counter() - t0
    peak_after = max_rss_bytes()
    print(json.dumps({
        "method": method,
        "seconds": seconds,
        "rss_before": rss_before,
        "peak_before": peak_before,
        "peak": peak_after,
        "threads": torch.get_num_threads(),
        "metrics": metrics,
    }))


def run_worker(method: str, data_dir: Path, chunk: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--data", str(data_dir),
           "--chunk", str(chunk)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"worker {method} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk", type=int, default=1024, help="rows per matmul for the chunked method")
    p.add_argument("--noise", type=float, default=10.0, help="caption noise norm relative to the image vector")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=("chunked", "full"), help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        worker(args.worker, args.data, args.chunk)
        return

    n, per, d = args.images, args.captions_per_image, args.dim
    m = n * per
    with tempfile.TemporaryDirectory(prefix="grain_eval_bench_") as tmp:
        data_dir = Path(tmp)
        img, txt, text_image = make_data(n, per, d, args.noise, args.seed)
        np.save(data_dir / "image_emb.npy", img)
        np.save(data_dir / "text_emb.npy", txt)
        np.save(data_dir / "text_image.npy", text_image)
        emb_mib = (img.nbytes + txt.nbytes) / MIB
        del img, txt, text_image

        print(f"retrieval memory bench: {n} images x {per} captions = {m} texts, D={d}, seed={args.seed}, "
              f"noise={args.noise}, chunk={args.chunk}")
        print(f"embeddings {emb_mib:.1f} MiB (float32); full [M, N] score matrix {m * n * 4 / MIB:.1f} MiB; "
              f"chunked score block <= {min(args.chunk, max(n, m)) * max(n, m) * 4 / MIB:.1f} MiB")
        results = {method: run_worker(method, data_dir, args.chunk) for method in ("chunked", "full")}

    print(f"{'method':<8} {'seconds':>8} {'RSS before MiB':>15} {'peak RSS MiB':>13} {'peak growth MiB':>16}  threads")
    for method, r in results.items():
        print(f"{method:<8} {r['seconds']:>8.2f} {r['rss_before'] / MIB:>15.1f} {r['peak'] / MIB:>13.1f} "
              f"{(r['peak'] - r['rss_before']) / MIB:>16.1f}  {r['threads']}")
    growth = {k: (r["peak"] - r["rss_before"]) / MIB for k, r in results.items()}
    if growth["chunked"] > 0:
        print(f"peak growth ratio full / chunked: {growth['full'] / growth['chunked']:.1f}x; "
              f"time ratio full / chunked: {results['full']['seconds'] / results['chunked']['seconds']:.2f}x")
    print("metrics (chunked):", json.dumps(results["chunked"]["metrics"]))
    same = results["chunked"]["metrics"] == results["full"]["metrics"]
    if same:
        print("metrics identical: yes")
    else:
        print("metrics (full):   ", json.dumps(results["full"]["metrics"]))
        print("metrics identical: NO")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
