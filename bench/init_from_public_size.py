"""Public-size open_clip checkpoints into grain's presets, measured: ViT-B-16 and ViT-B-32 built by open_clip's own
factory (random weights — nothing is downloaded — in the exact layout of the public ones), saved the way open_clip's
trainer saves them and as safetensors, then started as a grain run with ``train.init_from`` on the matching
``grain-openclip-vit-b*`` arch. Prints, per model and file: checkpoint size, the time to hash it (the fingerprint),
to check it against the arch (the preflight), to build the grain model with its towers loaded (``init_model``), and
the largest difference of image and text embeddings from open_clip's own model on the same inputs; then the same
round trip back through ``grain export``.

    python bench/init_from_public_size.py            # ViT-B-32 and ViT-B-16, ≈ 2 min and ≈ 3 GB of temp files
    python bench/init_from_public_size.py --models ViT-B-32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    ap.add_argument("--tmp", default=None, help="Folder for the checkpoints (default: a temporary folder).")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    import open_clip
    from safetensors.torch import save_file

    from grain.config import TrainConfig
    from grain.train.loop import init_model
    from grain.train.model import save_model
    from grain.train.openclip_io import _file_sha256, check_init_from, export_open_clip

    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        for name in args.models:
            arch = {"ViT-B-16": "grain-openclip-vit-b16", "ViT-B-32": "grain-openclip-vit-b32"}[name]
            torch.manual_seed(0)
            oc = open_clip.create_model(name, device="cpu").eval()
            state = oc.state_dict()
            files = {"trainer .pt": tmp / f"{name}-epoch_32.pt", "safetensors": tmp / f"{name}.safetensors"}
            torch.save({"epoch": 32, "name": name, "state_dict": {f"module.{k}": v for k, v in state.items()}},
                       files["trainer .pt"])
            save_file(state, files["safetensors"])
            g = torch.Generator().manual_seed(1)
            images = torch.randn(2, 3, 224, 224, generator=g)
            tokens = open_clip.get_tokenizer(name)(["a photo of a dog.", "a red square at the top left of a white page"])
            with torch.no_grad():
                ref_i, ref_t = oc.encode_image(images, normalize=True), oc.encode_text(tokens, normalize=True)
            for kind, path in files.items():
                cfg = TrainConfig(mode="grain", arch=arch, init_from=str(path))
                st = os.stat(path)
                _, t_hash = _timed(lambda: _file_sha256(str(path), st.st_size, st.st_mtime_ns))
                _, t_check = _timed(lambda: check_init_from(cfg))
                model, t_init = _timed(lambda: init_model(cfg).eval())
                with torch.no_grad():
                    di = (model.encode_image_tower(images) - ref_i).abs().max().item()
                    dt = (model.encode_text(tokens) - ref_t).abs().max().item()
                rows.append({"model": name, "file": kind, "MB": round(st.st_size / 1e6), "hash_s": round(t_hash, 2),
                             "check_s": round(t_check, 2), "init_s": round(t_init, 2), "image_diff": di, "text_diff": dt})
                print(json.dumps(rows[-1]), flush=True)
            # back out: the fine-tuned model's towers as an open_clip model, loaded by open_clip's factory
            save_model(model, tmp / f"{name}-grain")
            done, t_export = _timed(lambda: export_open_clip(tmp / f"{name}-grain", tmp / f"{name}-export"))
            row = {"model": name, "export_s": round(t_export, 2), "export_image_diff": done["max_image_diff"],
                   "export_text_diff": done["max_text_diff"]}
            print(json.dumps(row), flush=True)
            rows.append(row)
            for p in files.values():
                p.unlink()
    print("\n| model | file | MB | sha256 s | check s | init_model s | max image diff | max text diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "file" in r:
            print(f"| {r['model']} | {r['file']} | {r['MB']} | {r['hash_s']} | {r['check_s']} | {r['init_s']} | "
                  f"{r['image_diff']:.1e} | {r['text_diff']:.1e} |")
    for r in rows:
        if "export_s" in r:
            print(f"{r['model']}: grain export {r['export_s']} s, open_clip's factory reloads it with image/text "
                  f"differences {r['export_image_diff']:.1e} / {r['export_text_diff']:.1e}")


if __name__ == "__main__":
    main()
