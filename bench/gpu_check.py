"""The prepared device check: what a first GPU run needs to be fast, measured on one machine in one go (≤ 8 min on
one H100).

1. Train step of ``grain-vit-b16`` (the paper's model) at 224 px in bf16 autocast, in ``grain`` and ``clip`` mode,
   eager and ``torch.compile``d: ms/step, samples/s, FLOPs per step (FlopCounterMode, forward + backward), MFU
   against the GPU's dense bf16 peak, and host syncs per step as CUDA itself reports them
   (``torch.cuda.set_sync_debug_mode``) — the training loop's own ``train_step`` on batches prepared and moved as
   ``train()`` does (pinned memory, asynchronous copies). With compile, the number of graphs compiled over the
   timed steps (0 recompiles expected).
2. Loader images/s at 224 px on JPEG photos (640×480): ``TrainLoader`` with 1 decode thread against open_clip's
   CsvDataset on the same files (images/s per core), then with every core the process may use, pinned memory on,
   as a training process gets them.
3. OWLv2-B/16-sized detector (random weights, 960 px) at batch 32 in the ground stage's precision (bf16 on CUDA):
   ms/image, through bench/gpu_ground.py.
4. When more than one GPU is visible: a 2-step DDP run of ``train()`` on 2 GPUs (NCCL) with gradient accumulation 2.

Two steps, because the device machine cannot download anything and lacks some of grain's dependencies:

    .venv/bin/python bench/gpu_check.py prepare .gpu    # here: photos, the OWLv2 processor, the missing wheels
    # on the GPU machine, from a plain checkout (carry .gpu):
    python3 bench/gpu_check.py run .gpu --out $OUT/gpu_check.json

On a GPU machine with grain's venv (scripts/setup.sh) one command does both (no wheels needed):
``python bench/gpu_check.py run --out gpu_check.json``.

``prepare`` writes ``.gpu/photos/`` (JPEG crops of the mate-backgrounds photos scripts/setup_composite.sh
installs; read there, never committed), ``.gpu/owl-b16/`` (bench/gpu_ground.py prepare: processor and config, no
weights) and ``.gpu/wheels/`` (open_clip_torch, ftfy, wcwidth and pydantic for CPython 3.12 manylinux x86_64: the
GPU image has torch, transformers, pyarrow and the rest). ``run`` installs those wheels into a folder on
``sys.path`` when grain's imports need them, and imports grain from the checkout when it is not installed.

CPU smoke form (CI, tests/test_gpu_check.py; about a minute): grain-tiny, batch 8, 3 steps, compile with the
aot_eager backend, 64 photos made here (no Debian package needed), the tiny test OWLv2, and the DDP part on 2 CPU
processes over gloo:

    .venv/bin/python bench/gpu_check.py run --smoke --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PHOTO_SIZE = (640, 480)
#: Packages a bare GPU image lacks (open_clip and its text cleaning, pydantic), carried as CPython 3.12 manylinux
#: x86_64 wheels at the versions constraints.txt pins (what CI runs).
WHEELS = ("open_clip_torch", "ftfy", "wcwidth", "pydantic", "pydantic_core", "annotated-types", "typing-inspection")


def _pinned(names: tuple[str, ...]) -> list[str]:
    """``name==version`` from constraints.txt for each of ``names`` (pydantic and pydantic_core must match)."""
    canon = lambda n: n.lower().replace("_", "-")  # noqa: E731
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().split() if "==" in line)
    found = {canon(k): f"{k}=={v}" for k, v in pins.items()}
    missing = [n for n in names if canon(n) not in found]
    if missing:
        raise SystemExit(f"constraints.txt pins none of {missing}")
    return [found[canon(n)] for n in names]
#: Dense bf16 peak TFLOP/s by device name (no sparsity): H100 SXM / H200 989, H100 PCIe 756, A100 312.
PEAKS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}


def _use_wheels(folder: Path | None) -> None:
    """Install the carried wheels into a folder on sys.path (once), for a machine that lacks them."""
    if folder is None or not folder.is_dir():
        return
    target = Path(tempfile.gettempdir()) / "grain-gpu-check-site"
    if not target.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(target), *map(str, sorted(folder.glob("*.whl")))], check=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))


def _import_grain() -> None:
    sys.path.insert(0, str(BENCH))
    from checkout import import_grain

    import_grain("gpu_check", "grain.train.loop", "docs/train.md, 'A first GPU run'")


# ------------------------------------------------------------------------------------------------ prepare


def make_photos(folder: Path, n: int, sources: list[Path] | None = None) -> None:
    """``n`` 640×480 JPEG photos (quality 90) in ``folder``: 4:3 crops of ``sources`` (real photographs), or, when
    none are given, of gradient-and-noise pictures made here (the smoke form)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        if sources:
            im = Image.open(sources[i % len(sources)]).convert("RGB")
        else:
            base = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            im = Image.fromarray(base).resize((1280, 960), Image.BICUBIC)
        scale = rng.uniform(0.5, 0.9) * min(im.width / PHOTO_SIZE[0], im.height / PHOTO_SIZE[1])
        w, h = int(PHOTO_SIZE[0] * scale), int(PHOTO_SIZE[1] * scale)
        x, y = int(rng.integers(0, im.width - w + 1)), int(rng.integers(0, im.height - h + 1))
        im.crop((x, y, x + w, y + h)).resize(PHOTO_SIZE, Image.BICUBIC).save(folder / f"{i:06d}.jpg", quality=90)


def prepare(out: Path, photos: int, wheels: bool) -> None:
    """Photos (crops of the mate-backgrounds photos when installed, else made-up pictures, which decode alike but are
    not photographs), the OWLv2-B/16 processor and, with ``wheels``, the wheels a bare GPU image lacks."""
    sources = sorted(Path("/usr/share/backgrounds/mate").rglob("*.jpg"))
    if not sources:
        print("no photos under /usr/share/backgrounds/mate (scripts/setup_composite.sh installs them): "
              "the loader section reads made-up pictures instead", flush=True)
    make_photos(out / "photos", photos, sources)
    print(f"wrote {photos} JPEG pictures to {out / 'photos'}")
    subprocess.run([sys.executable, str(BENCH / "gpu_ground.py"), "prepare", str(out / "owl-b16")], check=True)
    if wheels:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", "-d", str(out / "wheels")]
        for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"):
            cmd += ["--platform", tag]
        subprocess.run([*cmd, *_pinned(WHEELS)], check=True, env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
        print(f"downloaded {len(list((out / 'wheels').glob('*.whl')))} wheels to {out / 'wheels'}")


# ------------------------------------------------------------------------------------------------ 1. train step


def train_step_section(arch_name: str, batch: int, steps: int, warmup: int, device: Any, compile_modes: list[bool],
                       backend: str, peak: float | None, world: dict[str, Path]) -> list[dict[str, Any]]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import train_step as ts
    from grain.config import TrainConfig
    from grain.train.loop import _compiled_graphs
    from grain.train.model import load_arch

    arch = load_arch(arch_name)
    cfg = TrainConfig(arch=arch_name, batch_size=batch)
    image_size, ctx = arch["vision_cfg"]["image_size"], arch["text_cfg"]["context_length"]
    batches = ts.take_batches(world, 2, batch, image_size, ctx, cfg)
    data = {"grain": batches, "clip": [ts.without_descriptions(b) for b in batches]}
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    flops: dict[str, float] = {}
    rows = []
    for compiled in compile_modes:
        for mode in ("grain", "clip"):
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
            t0 = time.perf_counter()
            c = ts.ours(mode, arch, cfg, data[mode], device, autocast, compiled, backend)
            for _ in range(warmup):  # compilation included
                c.step()
            sync()
            warm_s = time.perf_counter() - t0
            if mode not in flops:  # counted on the eager model (a compiled graph runs past the counter)
                with FlopCounterMode(display=False) as counter:
                    c.step()
                flops[mode] = float(counter.get_total_flops())
            syncs = _count_syncs(c.step) if cuda else None
            sync()
            graphs_before = _compiled_graphs()
            t0 = time.perf_counter()
            for _ in range(steps):
                c.step()
            sync()
            dt = (time.perf_counter() - t0) / steps
            row = {"mode": mode, "compile": compiled, "ms_per_step": 1e3 * dt, "samples_per_s": batch / dt,
                   "tflops_per_step": flops[mode] / 1e12, "achieved_tflops": flops[mode] / dt / 1e12,
                   "params": c.params, "warmup_s": warm_s, "host_syncs_per_step": syncs,
                   "graphs_compiled_while_timed": (_compiled_graphs() - graphs_before) if compiled else None}
            if peak:
                row["mfu"] = row["achieved_tflops"] / peak
            rows.append(row)
            print(f"train {mode:5s} compile={compiled!s:5s} {row['ms_per_step']:8.1f} ms/step "
                  f"{row['samples_per_s']:8.1f} samples/s {row['achieved_tflops']:9.3f} TFLOP/s"
                  + (f" MFU {row['mfu']:.3f}" if peak else "") + f" syncs/step {syncs}", flush=True)
            del c
            if cuda:
                torch.cuda.empty_cache()
    return rows


def _count_syncs(step: Any) -> int:
    """Host syncs of one step, as CUDA reports them (sync debug mode "warn": one warning per synchronising call)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


# ------------------------------------------------------------------------------------------------ 2. loader


def loader_section(photos: Path, root: Path, image_size: int, rounds: int, batch: int) -> dict[str, Any]:
    import torch

    import train_step as ts
    from grain.config import IngestConfig, TrainConfig
    from grain.data.ingest import ingest
    from grain.train.data import TrainLoader, default_num_workers

    files = sorted(photos.glob("*.jpg"))
    listing, absolute = root / "photos.tsv", root / "photos-open_clip.tsv"
    with open(listing, "w", newline="") as rel, open(absolute, "w", newline="") as fh:
        a, b = csv.writer(rel, delimiter="\t"), csv.writer(fh, delimiter="\t")
        a.writerow(["filepath", "title"])
        b.writerow(["filepath", "title"])
        for i, f in enumerate(files):
            a.writerow([f.name, f"a photograph, number {i}"])
            b.writerow([str(f.resolve()), f"a photograph, number {i}"])
    samples = root / "photo_samples"
    ingest(IngestConfig(source="csv", path=str(listing), image_root=str(photos.resolve()), image_column="filepath",
                        caption_column="title", num_shards=4), samples)
    cfg = TrainConfig()
    args = argparse.Namespace(loader_batch_size=batch, loader_rounds=rounds, loader_warmup=2)
    print("loader, one decode thread each:", flush=True)
    ratio = ts.compare_loaders(f"JPEG photos {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}", {"samples": samples}, absolute,
                               len(files), image_size, 77, cfg, args)
    out = {"images": len(files), "image_size": image_size, "ours_over_open_clip_per_core": ratio, "threads": {}}
    cores = default_num_workers(1)
    pin = torch.cuda.is_available()
    for threads in sorted({1, 2, 4, 8, cores} & set(range(1, cores + 1))):
        loader = TrainLoader(samples, batch_size=batch, image_size=image_size, context_length=77, num_workers=threads,
                             prefetch=4, pin_memory=pin)
        try:
            for _ in range(2):
                next(loader)
            n = max(4, 2 * len(files) // batch)
            t0 = time.perf_counter()
            for _ in range(n):
                next(loader)
            rate = batch * n / (time.perf_counter() - t0)
        finally:
            loader.close()
        out["threads"][threads] = rate
        print(f"TrainLoader {threads:2d} decode threads, pinned {pin}: {rate:8.1f} images/s", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ 3. OWLv2


def owl_section(model_dir: Path | None, device: str, images: int, batch: int, rounds: int) -> dict[str, Any]:
    import gpu_ground

    if model_dir is None:  # smoke: the tiny test OWLv2
        sys.path.insert(0, str(ROOT / "tests"))
        from support.tiny_owl import build_tiny_owlv2

        model_dir = Path(tempfile.mkdtemp(prefix="grain-gpu-check-owl-")) / "owl"
        build_tiny_owlv2(model_dir, seed=0)
    info = gpu_ground.run(model_dir, device, images, [batch], ["auto"], rounds, None)
    dtype = info["dtypes"][0]
    return {"dtype": dtype, "batch": batch,
            "ms_per_image": info["ms_per_image"][f"{dtype} OwlDetector.detect batch {batch} (prep incl.)"],
            "forward_ms_per_image": info["ms_per_image"][f"{dtype} model forward batch {batch} (prep excl.)"],
            "naive_ms_per_image": info["ms_per_image"][f"{dtype} naive per-image loop"]}


# ------------------------------------------------------------------------------------------------ 4. DDP


def ddp_section(world: dict[str, Path], out: Path, smoke: bool) -> dict[str, Any]:
    """``train()`` for 2 steps with grad_accum 2 on 2 processes (2 GPUs over NCCL; the smoke form: 2 CPU processes
    over gloo), launched by torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "ddp-worker", str(world["samples"]), str(world["descriptions"]), str(world["regions"]), str(out)]
    env = dict(os.environ)
    if smoke:
        cmd.append("--smoke")
        env.update(GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"DDP run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    print(f"DDP: {summary['world_size']} processes, {summary['steps']} steps, loss {summary['last']['loss']:.3f}", flush=True)
    return {"world_size": summary["world_size"], "steps": summary["steps"], "loss": summary["last"]["loss"],
            "seconds": time.perf_counter() - t0}


def ddp_worker(samples: Path, descriptions: Path, regions: Path, out: Path, smoke: bool) -> None:
    _import_grain()
    from grain.config import TrainConfig
    from grain.train.loop import train

    cfg = TrainConfig(arch="grain-tiny" if smoke else "grain-vit-b16", steps=2, batch_size=8, grad_accum=2,
                      warmup_steps=1, log_every=1, checkpoint_every=2, device="cpu" if smoke else "auto")
    train(cfg, samples, descriptions, regions, out, resume=None, progress=False)


# ------------------------------------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> dict[str, Any]:
    _use_wheels(args.dir / "wheels" if args.dir else None)
    _import_grain()
    sys.path.insert(0, str(BENCH))
    import torch

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but CUDA is not available here (use --smoke on a CPU)")
    import grain.train

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAKS.items() if k in name), None)
    report: dict[str, Any] = {"device": name, "gpus": torch.cuda.device_count() if cuda else 0,
                              "torch": torch.__version__, "peak_bf16_tflops": peak, "smoke": args.smoke,
                              "grain_train_from": str(Path(grain.train.__file__).parent)}
    print(json.dumps(report), flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="grain-gpu-check-") as tmp:
        root = Path(tmp)
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
        compile_modes = [False] if args.no_compile else [False, True]
        t0 = time.perf_counter()
        import train_step as ts

        world = ts.build_world(root / "world", max(4 * args.batch_size, 64), 96)  # synthetic, squashed to the arch
        report["train"] = train_step_section(args.arch, args.batch_size, args.steps, args.warmup, device,
                                             compile_modes, args.backend, peak, world)
        report["train_s"] = time.perf_counter() - t0
        prep = args.dir
        if prep is None:  # a machine with grain's venv: prepare here, now (the smoke form makes its own pictures)
            prep = root / "prep"
            if args.smoke:
                make_photos(prep / "photos", args.photos)
            else:
                prepare(prep, args.photos, wheels=False)
        t0 = time.perf_counter()
        report["loader"] = loader_section(prep / "photos", root, 224, args.loader_rounds, args.loader_batch)
        report["loader_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        owl_dir = None if args.smoke else prep / "owl-b16"
        report["owl"] = owl_section(owl_dir, args.device, args.owl_images, args.owl_batch, args.owl_rounds)
        report["owl_s"] = time.perf_counter() - t0
        gpus = torch.cuda.device_count() if cuda else 0
        if gpus > 1 or args.smoke:
            report["ddp"] = ddp_section(world, root / "ddp", smoke=not cuda)
        else:
            report["ddp"] = f"skipped: {gpus} GPU visible"
    report["total_s"] = time.perf_counter() - started
    print(json.dumps(report, indent=1), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="here: photos, the OWLv2 processor and the wheels the GPU machine lacks")
    p.add_argument("dir", type=Path)
    p.add_argument("--photos", type=int, default=256)
    p.add_argument("--no-wheels", action="store_true", help="skip downloading the wheels")
    r = sub.add_parser("run", help="measure (on the GPU machine; --smoke: the CPU form)")
    r.add_argument("dir", type=Path, nargs="?", help="the folder `prepare` wrote; without it, a machine with grain's "
                   "venv prepares in a temporary folder first (photos, the OWLv2 processor; no wheels)")
    r.add_argument("--smoke", action="store_true", help="CPU smoke form: grain-tiny, batch 8, 3 steps, aot_eager, "
                   "64 photos made here, the tiny OWLv2, DDP on 2 CPU processes")
    r.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    r.add_argument("--arch", default=None, help="default grain-vit-b16 (grain-tiny with --smoke)")
    r.add_argument("--batch-size", type=int, default=None, help="per step (default 128; --smoke 8)")
    r.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --smoke 3)")
    r.add_argument("--warmup", type=int, default=None, help="untimed steps first, compilation included (default 5)")
    r.add_argument("--no-compile", action="store_true", help="eager only")
    r.add_argument("--backend", default=None, help="torch.compile backend (default inductor; --smoke aot_eager)")
    r.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: from the name)")
    r.add_argument("--photos", type=int, default=None, help="pictures to make when none were prepared (default 256; "
                   "--smoke 64)")
    r.add_argument("--loader-rounds", type=int, default=None, help="default 3 (--smoke 1)")
    r.add_argument("--loader-batch", type=int, default=None, help="default 32 (--smoke 16)")
    r.add_argument("--owl-images", type=int, default=None, help="default 64 (--smoke 8)")
    r.add_argument("--owl-batch", type=int, default=None, help="default 32 (--smoke 4)")
    r.add_argument("--owl-rounds", type=int, default=None, help="default 2 (--smoke 1)")
    r.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    w = sub.add_parser("ddp-worker", help=argparse.SUPPRESS)
    for name in ("samples", "descriptions", "regions", "out"):
        w.add_argument(name, type=Path)
    w.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "prepare":
        _import_grain()
        prepare(args.dir, args.photos, not args.no_wheels)
        return
    if args.cmd == "ddp-worker":
        ddp_worker(args.samples, args.descriptions, args.regions, args.out, args.smoke)
        return
    smoke = args.smoke
    defaults = {"device": "cpu" if smoke else "cuda", "arch": "grain-tiny" if smoke else "grain-vit-b16",
                "batch_size": 8 if smoke else 128, "steps": 3 if smoke else 20, "warmup": 2 if smoke else 5,
                "backend": "aot_eager" if smoke else "inductor", "photos": 64 if smoke else 256,
                "loader_rounds": 1 if smoke else 3,
                "loader_batch": 16 if smoke else 32,
                "owl_images": 8 if smoke else 64, "owl_batch": 4 if smoke else 32, "owl_rounds": 1 if smoke else 2}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    run(args)


if __name__ == "__main__":
    main()
