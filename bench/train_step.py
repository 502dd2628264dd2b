"""Benchmark: training step time of GRAIN vs our CLIP baseline vs open_clip's CLIP, and loader images/s per core.

Part 1 — step time. Three contestants, same towers (the arch's ``vision_cfg`` / ``text_cfg``), same batch, same
image size, same seed and torch threads (default 1, see --threads), each doing a full optimizer step (zero_grad, forward, loss, backward,
AdamW step, logit-scale clamp) on the SAME pre-built batches (taken once from ``TrainLoader`` over a synthetic
world: real ingest → reference describe → reference ground, run through grain.stages into the folders it plans for
the bench's PipelineConfig (workdir: a temp folder); no data loading inside the timed region):

  a. GRAIN (ours):  ``build_model(arch, "grain")`` + ``GrainCriterion("grain", ...)`` through the training loop's
                    own ``grain.train.loop.train_step`` (gradient norm, NaN/inf guard, fused AdamW from
                    ``build_optimizer``, ``clamp_logit_scale``, LR schedule) on batches prepared as ``train()`` does.
  b. CLIP (ours):   ``build_model(arch, "clip")`` + ``GrainCriterion("clip", ...)``, same code path. Its batches
                    carry no descriptions, as ``train()`` feeds clip mode (regions not loaded): same images and
                    captions as (a).
  c. open_clip:     ``open_clip.model.CLIP(output_dict=True)`` + ``open_clip.loss.ClipLoss`` + AdamW (open_clip_train's
                    gain/bias vs rest weight-decay split), stepped the way ``open_clip_train.train.train_one_epoch``
                    does it (model(images, texts) → loss → backward → step → clamp logit_scale to ln 100).

(b) and (c) start from identical weights (same seed, same CLIP constructor), so their first losses must agree;
the script checks it. Timing: warm-up steps excluded, then ROUNDS rounds in which each contestant runs STEPS steps,
in rotating order (a,b,c / b,c,a / c,a,b ...) so background load hits all of them alike; the median per-step time
over rounds is reported. Targets: GRAIN / CLIP(ours) ≤ 1.15 and CLIP(ours) / open_clip ≤ 1.05.

Part 2 — loader images/s per core, on two image sets: (A) the synthetic world's N images (PNG, --image-px) at the
arch's image size, and (B) --photos JPEG photographs at 640×480 (quality 90; crops of the Debian
``mate-backgrounds`` photos that scripts/setup_composite.sh installs, the composite world's backgrounds) at
224 px, as a CC3M-style run reads them. Each set is read two ways, each with ONE decode thread and torch threads
= 1: (1) our samples/ Parquet shards (A: + descriptions/ + regions/ joined, the train stage's planned inputs;
B: written by grain's own CSV ingest) through ``TrainLoader(num_workers=1, prefetch=0)``; (2) the same image
bytes as files + a tab-separated CSV (filepath, title) through ``open_clip_train.data.CsvDataset`` with open_clip's
eval preprocess (``open_clip.image_transform``) and the same ``SimpleTokenizer``, via
``torch.utils.data.DataLoader(num_workers=0)``. One pass each after a short warm-up, interleaved over 3 rounds,
median. Ours ships uint8 (normalised later, on the device); CsvDataset returns normalised float32, as open_clip
trains on it. Target: ours / open_clip ≥ 1.0 on both sets.

    .venv/bin/python bench/train_step.py
    .venv/bin/python bench/train_step.py --arch grain-small --rounds 3
    .venv/bin/python bench/train_step.py --arch grain-vit-b16 --device cuda --batch-size 128 --part 1
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import io
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from grain.config import DescribeConfig, GroundConfig, IngestConfig, PipelineConfig, SyntheticConfig, TrainConfig
from grain.shards import read_table
from grain.stages import pipeline_stages, plan
from grain.train.data import Batch, TrainLoader
from grain.train.loop import build_optimizer, prepared, train_step
from grain.train.losses import GrainCriterion
from grain.train.model import build_model, load_arch, normalize_images

ARCHS = ("grain-tiny", "grain-tiny-paper", "grain-small", "grain-vit-b16")
GRAIN_OVER_CLIP_TARGET = 1.15
CLIP_OVER_OPENCLIP_TARGET = 1.05


# ------------------------------------------------------------------------------------------------ data


World = dict[str, Path]  # the train stage's planned inputs: {"samples", "descriptions", "regions"} -> folder


def world_config(root: Path, images: int, image_px: int) -> PipelineConfig:
    """The synthetic world's pipeline config: workdir ``root``, reference describe and ground, grain training."""
    return PipelineConfig(
        workdir=str(root),
        ingest=IngestConfig(num_shards=4, synthetic=SyntheticConfig(num_images=images, image_size=image_px)),
        describe=DescribeConfig(engine="reference"), ground=GroundConfig(engine="reference"),
        train=TrainConfig(mode="grain"),
    )


def build_world(root: Path, images: int, image_px: int) -> World:
    """samples/ + descriptions/ + regions/ from the real stages (in process, reference engines), each in the folder
    grain.stages.plan names under ``root``; returns the train stage's inputs (those folders, by name)."""
    cfg = world_config(root, images, image_px)
    for name in pipeline_stages(cfg, "train")[:-1]:  # ingest, describe, ground
        step = plan(cfg, name)
        step.stage.run(cfg, step.inputs, step.out, **({"contact_sheet": False} if name == "ground" else {}))
    world = plan(cfg, "train").inputs
    assert set(world) == {"samples", "descriptions", "regions"}, world
    return world


def take_batches(world: World, n: int, batch_size: int, image_size: int, context_length: int, cfg: TrainConfig) -> list[Batch]:
    loader = TrainLoader(world["samples"], world["descriptions"], world["regions"], batch_size=batch_size,
                         image_size=image_size, context_length=context_length, max_regions=cfg.max_regions,
                         rewrite_prob=cfg.rewrite_prob, seed=cfg.seed, num_workers=1, prefetch=0)
    try:
        return [next(loader) for _ in range(n)]
    finally:
        loader.close()


def without_descriptions(b: Batch) -> Batch:
    """What ``train()`` feeds clip mode: the same images and captions, no region descriptions."""
    return Batch(images=b.images, captions=b.captions, desc_tokens=b.desc_tokens[:0], desc_boxes=b.desc_boxes[:0],
                 desc_image=b.desc_image[:0], uids=list(b.uids), position=dict(b.position))


# ------------------------------------------------------------------------------------------------ part 1


@dataclass
class Contestant:
    key: str
    name: str
    step: Callable[[], Tensor]  # one full optimizer step; returns the (detached) loss
    params: int


def _cycle(items: list[Any]):
    while True:
        yield from items


def ours(mode: str, arch: dict[str, Any], cfg: TrainConfig, batches: list[Batch], device: torch.device,
         autocast: contextlib.AbstractContextManager, compile_: bool, backend: str = "inductor") -> Contestant:
    """Our contestant: the training loop's own ``train_step`` (forward, loss, backward, gradient norm, the NaN/inf
    guard, fused AdamW, logit-scale clamp, LR schedule) on batches prepared and moved as ``train()`` does."""
    torch.manual_seed(cfg.seed)
    model = build_model(arch, mode).to(device).train()
    opt, sched = build_optimizer(model, cfg)
    criterion = GrainCriterion.from_config(cfg, mode)
    net = torch.compile(model, backend=backend) if compile_ else model  # as train() does with train.compile
    stream = _cycle([prepared(b, cfg.grad_accum, model, device) for b in batches])

    def step() -> Tensor:
        loss, *_ = train_step(net, criterion, opt, sched, next(stream), cfg, autocast, device)
        return loss

    label = {"grain": "GRAIN (ours)", "clip": "CLIP (ours)"}[mode]
    return Contestant(mode, label, step, sum(p.numel() for p in model.parameters()))


def open_clip_reference(arch: dict[str, Any], cfg: TrainConfig, batches: list[Batch], device: torch.device,
                        autocast: Callable[[], contextlib.AbstractContextManager], compile_: bool) -> Contestant:
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(cfg.seed)
    model = open_clip.model.CLIP(arch["embed_dim"], CLIPVisionCfg(**arch["vision_cfg"]), CLIPTextCfg(**arch["text_cfg"]),
                                 output_dict=True).to(device).train()
    loss_fn = open_clip.loss.ClipLoss()
    # open_clip_train/main.py: no weight decay on gains, biases and the logit scale
    no_wd = [p for n, p in model.named_parameters() if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n]
    ids = {id(p) for p in no_wd}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW([{"params": no_wd, "weight_decay": 0.0}, {"params": rest, "weight_decay": cfg.weight_decay}],
                            lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    net = torch.compile(model) if compile_ else model
    # open_clip takes float images: our uint8 batches, normalised once up front (not timed; ours normalise per step)
    stream = _cycle([(normalize_images(b.images).to(device), b.captions.to(device)) for b in batches])
    max_log_scale = math.log(100)

    def step() -> Tensor:
        images, texts = next(stream)
        opt.zero_grad()
        with autocast():
            out = net(images, texts)
            losses = loss_fn(**out, output_dict=True)
            total = sum(losses.values())
        total.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_log_scale)
        return total.detach()

    return Contestant("open_clip", "open_clip CLIP", step, sum(p.numel() for p in model.parameters()))


def part1(args: argparse.Namespace, world: World, device: torch.device) -> None:
    arch = load_arch(args.arch)
    cfg = TrainConfig(arch=args.arch, batch_size=args.batch_size)
    image_size, ctx = int(arch["vision_cfg"]["image_size"]), int(arch["text_cfg"]["context_length"])
    batches = take_batches(world, args.batches, args.batch_size, image_size, ctx, cfg)
    clip_batches = [without_descriptions(b) for b in batches]
    cuda = device.type == "cuda"

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    # one object reused across steps, as train() does with its _autocast(...)
    step_autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    contestants = [
        ours("grain", arch, cfg, batches, device, step_autocast, args.compile),
        ours("clip", arch, cfg, clip_batches, device, step_autocast, args.compile),
        open_clip_reference(arch, cfg, clip_batches, device, autocast, args.compile),
    ]
    by_key = {c.key: c for c in contestants}

    # the first step of each: (b) and (c) have the same weights and inputs, so the same loss
    first = {c.key: float(c.step()) for c in contestants}
    for c in contestants:
        for _ in range(args.warmup - 1):
            c.step()
    sync()

    times: dict[str, list[float]] = {c.key: [] for c in contestants}
    for r in range(args.rounds):
        k = r % len(contestants)
        for c in contestants[k:] + contestants[:k]:
            gc.collect()
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                c.step()
            sync()
            times[c.key].append((time.perf_counter() - t0) / args.steps)

    m = sum(int(b.desc_tokens.shape[0]) for b in batches) / len(batches)
    print(f"== Part 1: train step, arch {args.arch} ({image_size} px, embed {arch['embed_dim']}, "
          f"vision {arch['vision_cfg']['width']}x{arch['vision_cfg']['layers']}, text {arch['text_cfg']['width']}x"
          f"{arch['text_cfg']['layers']}, decoder {arch['decoder']['layers']} layers x "
          f"{_region_queries(arch)}+1 queries, {arch['decoder'].get('query_type', 'learned')})")
    print(f"device {device}{' (bf16 autocast)' if cuda else ' (fp32)'}, torch threads {torch.get_num_threads()}, "
          f"batch {args.batch_size} ({len(batches)} pre-built batches, GRAIN: {m:.1f} descriptions/batch), "
          f"compile {args.compile}")
    print(f"{args.warmup} warm-up steps each, then {args.rounds} rounds x {args.steps} steps, rotating order")
    print(f"first-step loss: CLIP (ours) {first['clip']:.6f}  open_clip {first['open_clip']:.6f}  "
          f"(|diff| {abs(first['clip'] - first['open_clip']):.2e}); GRAIN {first['grain']:.4f}")
    print()
    print(f"{'contestant':<16} {'params':>11} {'ms/step median':>15} {'min':>9} {'max':>9} {'samples/s':>10}")
    med = {}
    for c in contestants:
        t = times[c.key]
        med[c.key] = statistics.median(t)
        print(f"{c.name:<16} {c.params:>11,} {1e3 * med[c.key]:>15.1f} {1e3 * min(t):>9.1f} {1e3 * max(t):>9.1f} "
              f"{args.batch_size / med[c.key]:>10.1f}")
    print()
    for label, num, den, target in (("GRAIN / CLIP(ours)", "grain", "clip", GRAIN_OVER_CLIP_TARGET),
                                    ("CLIP(ours) / open_clip", "clip", "open_clip", CLIP_OVER_OPENCLIP_TARGET)):
        ratio = med[num] / med[den]
        verdict = "meets target" if ratio <= target else "misses target"
        print(f"{label:<24} {ratio:.3f}  (target <= {target:.2f}): {verdict}")
    print("per-round ms/step: " + "; ".join(f"{by_key[k].name}: " + " ".join(f"{1e3 * x:.1f}" for x in v)
                                              for k, v in times.items()))


# ------------------------------------------------------------------------------------------------ part 2


def write_files(root: Path, samples: Path) -> tuple[Path, int]:
    """The samples' image bytes as files under ``root`` (unchanged) + a tab-separated CSV (filepath, title) for
    CsvDataset."""
    from PIL import Image

    folder = root / "files"
    folder.mkdir()
    rows = read_table(samples, columns=["uid", "image", "caption"]).to_pylist()
    csv_path = root / "train.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(["filepath", "title"])
        for i, row in enumerate(rows):
            fmt = Image.open(io.BytesIO(row["image"])).format.lower()
            path = folder / f"{i:06d}.{'jpg' if fmt == 'jpeg' else fmt}"
            path.write_bytes(row["image"])
            writer.writerow([str(path), row["caption"]])
    return csv_path, len(rows)


PHOTO_ROOT = Path("/usr/share/backgrounds/mate")


def build_photos(root: Path, n: int, size: tuple[int, int] = (640, 480), quality: int = 90) -> tuple[Path, Path]:
    """``n`` JPEG photos (random 4:3 crops of the mate-backgrounds photos, resized to ``size``) as files + a CSV,
    and the samples/ folder grain's CSV ingest makes of them (image bytes stored as they are). Returns
    ``(samples folder, csv path)``."""
    import numpy as np
    from PIL import Image

    from grain.data.ingest import ingest

    sources = sorted(p for p in PHOTO_ROOT.rglob("*.jpg"))
    if not sources:
        raise SystemExit(f"no photos under {PHOTO_ROOT}: run scripts/setup_composite.sh (apt-get mate-backgrounds)")
    rng = np.random.default_rng(0)
    folder = root / "photos"
    folder.mkdir()
    csv_path = root / "photos-open_clip.tsv"  # absolute paths, for CsvDataset
    ingest_list = root / "photos.tsv"  # paths relative to the folder (ingest confines them to image_root)
    with open(csv_path, "w", newline="") as fh, open(ingest_list, "w", newline="") as rel:
        writers = csv.writer(fh, delimiter="\t"), csv.writer(rel, delimiter="\t")
        for w in writers:
            w.writerow(["filepath", "title"])
        for i in range(n):
            src = sources[i % len(sources)]
            with Image.open(src) as im:
                im = im.convert("RGB")
                scale = rng.uniform(0.5, 0.9) * min(im.width / size[0], im.height / size[1])
                w, h = int(size[0] * scale), int(size[1] * scale)
                x, y = int(rng.integers(0, im.width - w + 1)), int(rng.integers(0, im.height - h + 1))
                im.crop((x, y, x + w, y + h)).resize(size, Image.BICUBIC).save(folder / f"{i:06d}.jpg", quality=quality)
            caption = f"a photograph, part of {src.stem}, number {i}"
            writers[0].writerow([str(folder / f"{i:06d}.jpg"), caption])
            writers[1].writerow([f"{i:06d}.jpg", caption])
    samples = root / "photo_samples"
    ingest(IngestConfig(source="csv", path=str(ingest_list), image_root=str(folder), image_column="filepath",
                        caption_column="title", num_shards=4), samples)
    return samples, csv_path


SHIMMED: list[str] = []


def import_csv_dataset() -> type:
    """``open_clip_train.data.CsvDataset``. That module imports ``braceexpand`` and ``webdataset`` at the top for its
    tar-shard readers, which CsvDataset never uses; when they are not installed, inert placeholder modules stand in
    for them (anything called on them raises), so CsvDataset itself runs unchanged."""
    import importlib
    import sys
    import types

    try:
        return importlib.import_module("open_clip_train.data").CsvDataset
    except ModuleNotFoundError as exc:
        if exc.name not in ("braceexpand", "webdataset"):
            raise

    def unavailable(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("placeholder: webdataset/braceexpand are not installed")

    class _Placeholder(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            return unavailable

    wds = _Placeholder("webdataset")
    wds.PipelineStage = type("PipelineStage", (), {})  # a base class at module level in open_clip_train.data
    for name in ("braceexpand", "webdataset", "webdataset.filters", "webdataset.tariterators"):
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            sys.modules[name] = wds if name == "webdataset" else _Placeholder(name)
            SHIMMED.append(name)
    return importlib.import_module("open_clip_train.data").CsvDataset


def ours_pass(world: World, n_batches: int, batch_size: int, image_size: int, ctx: int, cfg: TrainConfig, warmup: int) -> float:
    loader = TrainLoader(world["samples"], world.get("descriptions"), world.get("regions"), batch_size=batch_size,
                         image_size=image_size, context_length=ctx, max_regions=cfg.max_regions,
                         rewrite_prob=cfg.rewrite_prob, seed=cfg.seed, num_workers=1, prefetch=0)
    try:
        for _ in range(warmup):
            next(loader)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            next(loader)
        return time.perf_counter() - t0
    finally:
        loader.close()


def open_clip_pass(csv_path: Path, batch_size: int, image_size: int, ctx: int, warmup: int) -> float:
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    CsvDataset = import_csv_dataset()

    dataset = CsvDataset(str(csv_path), open_clip.image_transform(image_size, is_train=False), img_key="filepath",
                         caption_key="title", sep="\t", tokenizer=SimpleTokenizer(context_length=ctx))
    # open_clip_train.data.get_csv_dataset: shuffle and drop_last when training
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    n = sum(1 for _ in loader)  # one full pass
    dt = time.perf_counter() - t0
    assert n == len(dataset) // batch_size
    return dt


def compare_loaders(title: str, world: World, csv_path: Path, n: int, image_size: int, ctx: int, cfg: TrainConfig,
                    args: argparse.Namespace) -> float:
    """One loader comparison (both sides on one core); prints its table and returns ours / open_clip."""
    bs = args.loader_batch_size
    n_batches = n // bs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        secs: dict[str, list[float]] = {"ours": [], "open_clip": []}
        for r in range(args.loader_rounds):
            order = ("ours", "open_clip") if r % 2 == 0 else ("open_clip", "ours")
            for who in order:
                gc.collect()
                if who == "ours":
                    secs[who].append(ours_pass(world, n_batches, bs, image_size, ctx, cfg, args.loader_warmup))
                else:
                    secs[who].append(open_clip_pass(csv_path, bs, image_size, ctx, args.loader_warmup))
    finally:
        torch.set_num_threads(threads)
    images = n_batches * bs
    rate = {k: images / statistics.median(v) for k, v in secs.items()}
    ratio = rate["ours"] / rate["open_clip"]
    print(f"-- {title}: {images} images -> {image_size} px, batch {bs}, one pass after {args.loader_warmup} warm-up "
          f"batches, {args.loader_rounds} rounds interleaved, median")
    print(f"{'loader':<44} {'s/pass median':>13} {'images/s/core':>14}")
    print(f"{'ours: Parquet shards + TrainLoader':<44} {statistics.median(secs['ours']):>13.3f} {rate['ours']:>14.1f}")
    print(f"{'open_clip: files + CSV + CsvDataset':<44} {statistics.median(secs['open_clip']):>13.3f} {rate['open_clip']:>14.1f}")
    print(f"ours / open_clip (images/s) = {ratio:.3f}  (target >= 1.0: {'meets' if ratio >= 1.0 else 'misses'} target)")
    print("per-round s/pass: " + "; ".join(f"{k}: " + " ".join(f"{x:.3f}" for x in v) for k, v in secs.items()))
    print()
    return ratio


def part2(args: argparse.Namespace, root: Path, world: World) -> None:
    arch = load_arch(args.arch)
    cfg = TrainConfig(arch=args.arch)
    image_size, ctx = int(arch["vision_cfg"]["image_size"]), int(arch["text_cfg"]["context_length"])
    print("== Part 2: loader images/s per core. Both decode on ONE core: ours TrainLoader(num_workers=1, prefetch=0), "
          "open_clip DataLoader(num_workers=0); torch threads = 1")
    print()
    csv_path, n = write_files(root, world["samples"])
    compare_loaders(f"(A) synthetic world, {args.image_px} px PNG, descriptions/ + regions/ joined", world, csv_path, n,
                    image_size, ctx, cfg, args)
    if args.photos:
        samples, photo_csv = build_photos(root, args.photos)
        compare_loaders("(B) JPEG photos 640x480 (mate-backgrounds crops)", {"samples": samples}, photo_csv,
                        args.photos, 224, ctx, cfg, args)
    print("note: in (A) ours does strictly more per image (joins descriptions/ and regions/ by uid, draws the caption "
          f"rewrite, tokenises the caption and up to {cfg.max_regions} descriptions, selects and converts boxes); "
          "ours squash-resizes to S x S, open_clip resizes the short side and centre-crops")
    if SHIMMED:
        print(f"(open_clip_train.data imported with placeholders for the uninstalled {', '.join(SHIMMED)}: used only by "
              "its webdataset readers, not by CsvDataset)")


# ------------------------------------------------------------------------------------------------ main


def _region_queries(arch: dict) -> int:
    """Region queries of the decoder: one per patch for query_type "patches", else num_region_queries."""
    dec, vis = arch["decoder"], arch["vision_cfg"]
    return (vis["image_size"] // vis["patch_size"]) ** 2 if dec.get("query_type") == "patches" else dec["num_region_queries"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="grain-tiny", choices=ARCHS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16 autocast for all three)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per contestant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contestant first (>= 1)")
    parser.add_argument("--batches", type=int, default=4, help="pre-built batches the steps cycle through")
    parser.add_argument("--compile", action="store_true", help="torch.compile all three models")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in part 1 (default 1: on a small shared machine, OpenMP threads contending "
                             "with another process make steps 10-50x slower and noise-dominated)")
    parser.add_argument("--images", type=int, default=512, help="synthetic images in the world (part 2 reads them all)")
    parser.add_argument("--image-px", type=int, default=96, help="synthetic image side")
    parser.add_argument("--photos", type=int, default=512,
                        help="part 2 (B): JPEG photos to make from mate-backgrounds (0: skip set B)")
    parser.add_argument("--loader-batch-size", type=int, default=32)
    parser.add_argument("--loader-rounds", type=int, default=3)
    parser.add_argument("--loader-warmup", type=int, default=2, help="batches read before the timed pass")
    parser.add_argument("--part", choices=("1", "2", "both"), default="both")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.compile and args.warmup <= args.batches:
        args.warmup = args.batches + 1  # every batch shape (descriptions per batch vary) is compiled before timing
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="grain-bench-train-"))
    try:
        t0 = time.perf_counter()
        world = build_world(work, args.images, args.image_px)
        print(f"synthetic world: {args.images} images, {args.image_px} px, built in {time.perf_counter() - t0:.1f} s")
        print()
        if args.part in ("1", "both"):
            part1(args, world, device)
            print()
        if args.part in ("2", "both"):
            part2(args, work, world)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
