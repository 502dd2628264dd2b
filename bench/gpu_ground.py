"""GPU benchmark for the ground stage's detector (prepared for a machine with one CUDA GPU, e.g. an H200; ≈ 3 min):
OWLv2-B/16-sized random weights (same shapes as google/owlv2-base-patch16-ensemble: 960 px, ViT-B/16 image tower,
12-layer text tower), ms/image

- of the naive per-image Hugging Face loop (processor → model → post-processing, one image at a time),
- of grain's ``OwlDetector.detect`` (what each ground actor runs) at batch 16 and 64, preprocessing included
  (decoding on the host, padding/resizing/normalising on the GPU), and the same with all preprocessing on the host,
- of the model forward alone at batch 16 and 64 (inputs prepared beforehand: preprocessing excluded),

in float16 and bfloat16, on N JPEG images of mixed non-square sizes with 6 text queries each.

Two steps, because the device machine has neither open_clip (the tokenizer's vocabulary comes from it) nor
pydantic, and 600 MB of weights cannot travel:

    .venv/bin/python bench/gpu_ground.py prepare .gpu/owl-b16      # here: processor + config, no weights (≈ 2 MB)
    # on the GPU machine (carry .gpu and the pydantic wheels, see the device README):
    python3 bench/gpu_ground.py run .gpu/owl-b16 --out $OUT/gpu_ground.json

``run`` builds the random model from the config with a fixed seed, saves it next to the processor and imports grain
from this checkout without installing it. ``run --device cpu --small`` is the CPU smoke test.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
B16 = dict(hidden=768, layers=12, heads=12, text_hidden=512, text_layers=12, text_heads=8, projection=512, image_size=960)
SMALL = dict(hidden=64, layers=2, heads=2, text_hidden=64, text_layers=2, text_heads=2, projection=64, image_size=192)
QUERIES = ["a red head of a bird", "a long blue tail", "two thin legs", "a yellow beak", "a striped wing", "a round eye"]


def _import_grain() -> None:
    """Make ``grain.*`` importable from this checkout (the repo folders are the subpackages) without pip."""
    try:
        import grain.annotate.ground  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT))
        import grain

        grain.__path__.append(str(ROOT))


def prepare(out: Path, small: bool) -> None:
    from transformers import Owlv2Config, Owlv2ImageProcessor, Owlv2Processor

    sys.path.insert(0, str(ROOT / "tests"))  # the test harnesses (tests/support) are not installed
    from support.tiny_owl import BOS_ID, EOS_ID, MAX_TEXT_LENGTH, PAD_ID, PATCH_SIZE, VOCAB_SIZE, build_clip_tokenizer

    s = SMALL if small else B16
    text = dict(hidden_size=s["text_hidden"], intermediate_size=4 * s["text_hidden"], num_hidden_layers=s["text_layers"],
                num_attention_heads=s["text_heads"], vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_TEXT_LENGTH,
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    vision = dict(hidden_size=s["hidden"], intermediate_size=4 * s["hidden"], num_hidden_layers=s["layers"],
                  num_attention_heads=s["heads"], image_size=s["image_size"], patch_size=PATCH_SIZE)
    out.mkdir(parents=True, exist_ok=True)
    Owlv2Config(text_config=text, vision_config=vision, projection_dim=s["projection"]).save_pretrained(out)
    size = {"height": s["image_size"], "width": s["image_size"]}
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size=size), tokenizer=build_clip_tokenizer()).save_pretrained(out)
    print(f"wrote processor + config ({'small' if small else 'B/16'} shapes, no weights) to {out}")


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


def run(model_dir: Path, device: str, images: int, out_json: Path | None, rounds: int) -> None:
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
        print(f"{key:42s} {results[key]:8.2f} ms/image", flush=True)

    for dtype in ("float16", "bfloat16"):
        cfg = GroundConfig(engine="owlv2", model=str(model_dir), device=device, dtype=dtype)
        det = OwlDetector(cfg)
        # What the detector did before preprocessing moved to the device: pad/resize/normalise by the host's CPU.
        host_det = OwlDetector(cfg, prep_device="cpu") if device != "cpu" else None
        processor = Owlv2Processor.from_pretrained(model_dir)
        model = det.model

        def naive() -> None:
            for row in rows:
                image = Image.open(io.BytesIO(row["image"])).convert("RGB")
                inputs = processor(text=[QUERIES], images=image, return_tensors="pt", truncation=True)
                inputs = {k: (v.to(device, dtype=model.dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
                with torch.inference_mode():
                    outputs = model(**inputs)
                side = max(image.size)
                processor.post_process_grounded_object_detection(outputs, threshold=0.3, target_sizes=[(side, side)], text_labels=[QUERIES])

        timed(f"{dtype} naive per-image loop", naive, len(rows))
        for bs in (16, 64):
            batches = [rows[i : i + bs] for i in range(0, len(rows) - bs + 1, bs)]
            timed(f"{dtype} OwlDetector.detect batch {bs} (prep incl.)", lambda: [det.detect(b) for b in batches], bs * len(batches))
            if host_det is not None:
                timed(f"{dtype} OwlDetector.detect batch {bs} (prep on host)", lambda: [host_det.detect(b) for b in batches], bs * len(batches))
            pil = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in rows[:bs]]
            prepared = processor(text=[QUERIES] * bs, images=pil, return_tensors="pt", truncation=True)
            prepared = {k: (v.to(device, dtype=model.dtype) if v.is_floating_point() else v.to(device)) for k, v in prepared.items()}

            def forward() -> None:
                with torch.inference_mode():
                    model(**prepared)

            timed(f"{dtype} model forward batch {bs} (prep excl.)", forward, bs)
        det = host_det = model = None  # free the GPU memory before the next dtype
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    info = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu", "torch": torch.__version__,
            "images": images, "queries_per_image": len(QUERIES), "ms_per_image": results}
    for dtype in ("float16", "bfloat16"):
        naive_ms = results[f"{dtype} naive per-image loop"]
        for bs in (16, 64):
            info[f"{dtype}_speedup_detect_b{bs}_vs_naive"] = naive_ms / results[f"{dtype} OwlDetector.detect batch {bs} (prep incl.)"]
            host = results.get(f"{dtype} OwlDetector.detect batch {bs} (prep on host)")
            if host is not None:
                info[f"{dtype}_speedup_detect_b{bs}_prep_on_host_vs_naive"] = naive_ms / host
    print(json.dumps(info, indent=1))
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(info, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write processor + config (needs open_clip: run it here)")
    p.add_argument("dir", type=Path)
    p.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke test")
    r = sub.add_parser("run", help="build random weights and measure")
    r.add_argument("dir", type=Path)
    r.add_argument("--device", default="cuda")
    r.add_argument("--images", type=int, default=128)
    r.add_argument("--rounds", type=int, default=3, help="timed repetitions; the best is reported")
    r.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    _import_grain()
    if args.cmd == "prepare":
        prepare(args.dir, args.small)
    else:
        run(args.dir, args.device, args.images, args.out, args.rounds)


if __name__ == "__main__":
    main()
