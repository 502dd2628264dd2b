"""GPU benchmark for the ground stage's detector (prepared for a machine with one CUDA GPU, e.g. an H200; ≈ 3 min):
OWLv2-B/16-sized random weights (same shapes as google/owlv2-base-patch16-ensemble: 960 px, ViT-B/16 image tower,
12-layer text tower), ms/image

- of the naive per-image Hugging Face loop (processor → model → post-processing, one image at a time),
- of grain's ``OwlDetector.detect`` (what each ground actor runs) at each ``--batch-sizes`` (default 16 and 64),
  preprocessing included (decoding on the host, padding/resizing/normalising on the GPU), and the same with all
  preprocessing on the host,
- of the model forward alone at the same batch sizes (inputs prepared beforehand: preprocessing excluded),

on N JPEG images of mixed non-square sizes with 6 text queries each, in the precision the ground stage uses
(``--dtypes auto``: bfloat16 on CUDA -- the towers under autocast, the box and class heads and the boxes in
float32 -- and float32 on a CPU; ``--dtypes bfloat16,float16,float32`` compares). Every variant, the naive loop
included, runs the same model in the same precision.

Two steps, because the device machine has neither open_clip (the tokenizer's vocabulary comes from it) nor
pydantic, and 600 MB of weights cannot travel:

    .venv/bin/python bench/gpu_ground.py prepare .gpu/owl-b16      # here: processor + config, no weights (≈ 2 MB)
    # on the GPU machine (carry .gpu and the pydantic wheels, see docs/ground.md):
    python3 bench/gpu_ground.py run .gpu/owl-b16 --out $OUT/gpu_ground.json

``run`` builds the random model from the config with a fixed seed and saves it next to the processor. Neither step
needs grain installed: ``python bench/gpu_ground.py`` imports grain from this checkout (the repository folders
are its sub-packages) when it is not installed.

CPU smoke test (seconds; the tiny test OWLv2 of tests/support/tiny_owl.py, built locally, 8 images, batches of 4
and 8, one round; needs open_clip like ``prepare``):

    .venv/bin/python bench/gpu_ground.py run --tiny --device cpu
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
B16 = dict(hidden=768, layers=12, heads=12, text_hidden=512, text_layers=12, text_heads=8, projection=512, image_size=960)
QUERIES = ["a red head of a bird", "a long blue tail", "two thin legs", "a yellow beak", "a striped wing", "a round eye"]
#: (images, batch sizes, rounds) when not given: the GPU measurement, and the --tiny smoke test.
DEFAULTS = {False: (128, (16, 64), 3), True: (8, (4, 8), 1)}


def _import_grain() -> None:
    """grain from this checkout when it is not installed (bench/checkout.py)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from checkout import import_grain

    import_grain("gpu_ground", "grain.annotate.ground", "docs/ground.md")


def _test_support() -> None:
    sys.path.insert(0, str(ROOT / "tests"))  # the test harnesses (tests/support) are not installed


def prepare(out: Path) -> None:
    """Write the B/16-shaped processor + config (no weights) to ``out``."""
    from transformers import Owlv2Config, Owlv2ImageProcessor, Owlv2Processor

    _test_support()
    from support.tiny_owl import BOS_ID, EOS_ID, MAX_TEXT_LENGTH, PAD_ID, PATCH_SIZE, VOCAB_SIZE, build_clip_tokenizer

    s = B16
    text = dict(hidden_size=s["text_hidden"], intermediate_size=4 * s["text_hidden"], num_hidden_layers=s["text_layers"],
                num_attention_heads=s["text_heads"], vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_TEXT_LENGTH,
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    vision = dict(hidden_size=s["hidden"], intermediate_size=4 * s["hidden"], num_hidden_layers=s["layers"],
                  num_attention_heads=s["heads"], image_size=s["image_size"], patch_size=PATCH_SIZE)
    out.mkdir(parents=True, exist_ok=True)
    Owlv2Config(text_config=text, vision_config=vision, projection_dim=s["projection"]).save_pretrained(out)
    size = {"height": s["image_size"], "width": s["image_size"]}
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size=size), tokenizer=build_clip_tokenizer()).save_pretrained(out)
    print(f"wrote processor + config (B/16 shapes, no weights) to {out}")


def _images(n: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(640, 480), (480, 640), (800, 533), (500, 375), (1024, 683), (427, 640)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1.0, (1, 1, 3))
        y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None] * rng.uniform(0.3, 1.0, (1, 1, 3))
        buf = io.BytesIO()
        Image.fromarray(((x + y) / 2).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def run(model_dir: Path, device: str, images: int, batch_sizes: list[int], dtypes: list[str], rounds: int,
        out_json: Path | None) -> dict:
    """Time every variant for every dtype; returns (and prints, and writes to ``out_json``) the figures."""
    import torch
    from PIL import Image
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor

    from grain.annotate.ground import OwlDetector
    from grain.config import GroundConfig

    if not (model_dir / "model.safetensors").exists():
        torch.manual_seed(0)
        Owlv2ForObjectDetection(Owlv2Config.from_pretrained(model_dir)).save_pretrained(model_dir)
    data = _images(images)
    rows = [{"uid": str(i), "image": b, "descriptions": QUERIES} for i, b in enumerate(data)]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    results: dict[str, float] = {}

    def timed(key: str, fn, count: int) -> None:
        fn()  # warm-up (allocations, kernel selection)
        sync()
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t0)
        results[key] = 1000 * best / count
        print(f"{key:50s} {results[key]:8.2f} ms/image", flush=True)

    resolved = []
    for dtype in dtypes:
        cfg = GroundConfig(engine="owlv2", model=str(model_dir), device=device, dtype=dtype)
        dtype = cfg.resolved_dtype()  # what the ground stage runs for this device
        if dtype in resolved:
            continue
        resolved.append(dtype)
        det = OwlDetector(cfg)
        # What the detector did before preprocessing moved to the device: pad/resize/normalise by the host's CPU.
        host_det = OwlDetector(cfg, prep_device="cpu") if device != "cpu" else None
        processor = Owlv2Processor.from_pretrained(model_dir)
        model = det.model  # float32 weights; det.autocast() is the precision the stage runs in

        def naive() -> None:
            for row in rows:
                image = Image.open(io.BytesIO(row["image"])).convert("RGB")
                inputs = processor(text=[QUERIES], images=image, return_tensors="pt", truncation=True).to(device)
                with torch.inference_mode(), det.autocast():
                    outputs = model(**inputs)
                side = max(image.size)
                processor.post_process_grounded_object_detection(outputs, threshold=0.3, target_sizes=[(side, side)], text_labels=[QUERIES])

        timed(f"{dtype} naive per-image loop", naive, len(rows))
        for bs in batch_sizes:
            batches = [rows[i : i + bs] for i in range(0, len(rows) - bs + 1, bs)]  # full batches only (bs <= images)
            timed(f"{dtype} OwlDetector.detect batch {bs} (prep incl.)", lambda: [det.detect(b) for b in batches], bs * len(batches))
            if host_det is not None:
                timed(f"{dtype} OwlDetector.detect batch {bs} (prep on host)", lambda: [host_det.detect(b) for b in batches], bs * len(batches))
            pil = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in rows[:bs]]
            prepared = processor(text=[QUERIES] * bs, images=pil, return_tensors="pt", truncation=True).to(device)

            def forward() -> None:
                with torch.inference_mode(), det.autocast():
                    model(**prepared)

            timed(f"{dtype} model forward batch {bs} (prep excl.)", forward, bs)
        det = host_det = model = None  # free the GPU memory before the next dtype
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    info = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu", "torch": torch.__version__,
            "model": str(model_dir), "images": images, "queries_per_image": len(QUERIES), "batch_sizes": batch_sizes,
            "dtypes": resolved, "rounds": rounds, "ms_per_image": results}
    for dtype in resolved:
        naive_ms = results[f"{dtype} naive per-image loop"]
        for bs in batch_sizes:
            info[f"{dtype}_speedup_detect_b{bs}_vs_naive"] = naive_ms / results[f"{dtype} OwlDetector.detect batch {bs} (prep incl.)"]
            host = results.get(f"{dtype} OwlDetector.detect batch {bs} (prep on host)")
            if host is not None:
                info[f"{dtype}_speedup_detect_b{bs}_prep_on_host_vs_naive"] = naive_ms / host
    print(json.dumps(info, indent=1))
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(info, indent=1))
    return info


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write the B/16 processor + config, no weights (needs open_clip: run it here)")
    p.add_argument("dir", type=Path)
    r = sub.add_parser("run", help="build random weights and measure")
    r.add_argument("dir", type=Path, nargs="?", help="a folder from `prepare` (with --tiny: where to build the tiny "
                   "model; default a temporary folder)")
    r.add_argument("--tiny", action="store_true", help="CPU smoke test: the tiny test OWLv2 (tests/support/tiny_owl.py, "
                   "built locally; needs open_clip) with 8 images, batches 4 and 8, one round unless given")
    r.add_argument("--device", default="cuda")
    r.add_argument("--images", type=int, default=None, help="images to time (default 128; --tiny 8)")
    r.add_argument("--batch-sizes", type=_int_list, default=None, help="detect/forward batch sizes, e.g. 16,64 (the "
                   "default; --tiny 4,8); sizes above --images are skipped")
    r.add_argument("--dtypes", default="auto", help="comma-separated ground.dtype values (default auto: bfloat16 on "
                   "CUDA, float32 on a CPU)")
    r.add_argument("--rounds", type=int, default=None, help="timed repetitions, the best is reported (default 3; --tiny 1)")
    r.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    _import_grain()
    if args.cmd == "prepare":
        prepare(args.dir)
        return

    images, batch_sizes, rounds = DEFAULTS[args.tiny]
    images = images if args.images is None else args.images
    batch_sizes = list(batch_sizes if args.batch_sizes is None else args.batch_sizes)
    rounds = rounds if args.rounds is None else args.rounds
    if images < 1 or rounds < 1:
        parser.error(f"--images and --rounds must be at least 1 (got {images}, {rounds})")
    fitting = [bs for bs in batch_sizes if bs <= images]
    if not fitting:
        parser.error(f"--images {images} is smaller than every --batch-sizes value {batch_sizes}: no full batch to time")
    if fitting != batch_sizes:
        print(f"skipping batch sizes {[bs for bs in batch_sizes if bs > images]}: larger than --images {images}")
    from grain.config import GroundConfig

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    allowed = GroundConfig.model_fields["dtype"].annotation.__args__
    if not dtypes or any(d not in allowed for d in dtypes):
        parser.error(f"--dtypes {args.dtypes!r}: each must be one of {', '.join(allowed)}")

    if args.tiny:
        _test_support()
        from support.tiny_owl import build_tiny_owlv2

        with tempfile.TemporaryDirectory(prefix="grain-gpu-ground-tiny-") as tmp:
            model_dir = args.dir or Path(tmp) / "owl"
            build_tiny_owlv2(model_dir, seed=0)
            run(model_dir, args.device, images, fitting, dtypes, rounds, args.out)
        return
    if args.dir is None:
        parser.error("run needs the folder written by `prepare` (or --tiny)")
    if not (args.dir / "config.json").exists():
        parser.error(f"{args.dir} has no config.json: run `bench/gpu_ground.py prepare {args.dir}` first")
    run(args.dir, args.device, images, fitting, dtypes, rounds, args.out)


if __name__ == "__main__":
    main()
