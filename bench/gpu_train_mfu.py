"""GPU benchmark (prepared for a machine with one CUDA GPU, e.g. an H200; ≤ 8 minutes): samples/s and MFU of
`grain-vit-b16` in `grain` and `clip` mode at batch 128, 224 px, bf16 autocast, eager and torch.compile.

FLOPs per step are counted once per contestant with torch.utils.flop_counter.FlopCounterMode (forward + backward
of one real step: matmuls/convolutions/attention as PyTorch counts them); MFU = FLOPs/step × steps/s ÷ the GPU's
dense bf16 peak (--peak-tflops; H200 SXM: 989 TFLOPS). Uses the same contestants as bench/train_step.py (our
forward_backward + AdamW step) on real batches from TrainLoader (synthetic world, squashed to 224 px).

    python bench/gpu_train_mfu.py --batch-size 128 --steps 20            # on the GPU machine
    python bench/gpu_train_mfu.py --arch grain-tiny --batch-size 8 --steps 2 --device cpu --no-compile   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ts  # noqa: E402  (the shared contestants of bench/train_step.py)

from grain.config import TrainConfig  # noqa: E402
from grain.train.model import load_arch  # noqa: E402


def measure(key: str, make, steps: int, warmup: int, device: torch.device) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    contestant = make()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):  # includes compilation when compiled
        contestant.step()
    sync()
    with FlopCounterMode(display=False) as counter:
        contestant.step()
    flops = counter.get_total_flops()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        contestant.step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    return {"key": key, "params": contestant.params, "s_per_step": dt, "flops_per_step": flops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="grain-vit-b16")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H200 SXM: 989)")
    ap.add_argument("--images", type=int, default=512)
    args = ap.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    arch = load_arch(args.arch)
    cfg = TrainConfig(arch=args.arch, batch_size=args.batch_size)
    root = Path(tempfile.mkdtemp(prefix="grain-mfu-"))
    world = ts.build_world(root, args.images, 96)  # the stage folders grain.stages plans under root
    image_size = arch["vision_cfg"]["image_size"]
    batches = ts.take_batches(world, 2, args.batch_size, image_size, arch["text_cfg"]["context_length"], cfg)
    clip_batches = [ts.without_descriptions(b) for b in batches]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    print(f"{args.arch} batch {args.batch_size} at {image_size} px on {torch.cuda.get_device_name(device) if cuda else 'cpu'}"
          f", bf16 autocast {cuda}; descriptions/batch {batches[0].desc_tokens.shape[0]}", flush=True)
    rows = []
    for compiled in ([False] if args.no_compile else [False, True]):
        for mode, data in (("grain", batches), ("clip", clip_batches)):
            def make(mode=mode, data=data, compiled=compiled):
                return ts.ours(mode, arch, cfg, data, device, autocast(), compiled, train_extras=True)

            t0 = time.perf_counter()
            r = measure(f"{mode}{' +compile' if compiled else ''}", make, args.steps, args.warmup, device)
            r["wall"] = time.perf_counter() - t0
            r["samples_per_s"] = args.batch_size / r["s_per_step"]
            r["mfu"] = r["flops_per_step"] / r["s_per_step"] / (args.peak_tflops * 1e12)
            rows.append(r)
            print(f"{r['key']:16s} {r['samples_per_s']:9.1f} samples/s  {r['s_per_step'] * 1e3:8.1f} ms/step  "
                  f"{r['flops_per_step'] / 1e9:9.1f} GFLOP/step  MFU {100 * r['mfu']:5.1f} %  (incl. warm-up {r['wall']:.0f} s)",
                  flush=True)
            if cuda:
                torch.cuda.empty_cache()
    by = {r["key"]: r for r in rows}
    for suffix in ("", " +compile"):
        if f"grain{suffix}" in by:
            print(f"GRAIN / CLIP step time{suffix}: {by['grain' + suffix]['s_per_step'] / by['clip' + suffix]['s_per_step']:.3f}")
    print("anchor: open_clip ViT-B/16 ≈ 340 samples/s on an A100; goal on an H200: ≥ 40 % MFU")


if __name__ == "__main__":
    main()
