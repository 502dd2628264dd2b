"""Benchmark: wall time of the evaluate stage vs an equivalent plain loop (encode all images, one score matrix).

Same model (a grain-tiny model, random weights, saved with save_model), same images (the synthetic world's
`single` split, unseen classes), same work: the `names` mode's top-1/top-5 accuracy. The plain loop is what a user
writes by hand: decode + resize every image with PIL, encode in batches, encode the class prompts, one matrix,
topk. The stage run is measured cold (empty embedding cache) and warm (cache hit: what trying another mode costs).

The stage's folders are the registry's (grain.stages) for the bench's PipelineConfig (workdir: a temp folder, the
model given as evaluate.model): the split is ingested up front into the samples/ folder the stage itself reads
(``synthetic_eval_samples``), the timed ``evaluate`` writes the evaluate stage's planned eval/<fingerprint> folder,
and a cold run starts from an emptied ``eval_cache_dir``.

    .venv/bin/python bench/eval_speed.py --images 2000
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from grain.config import EvalConfig, IngestConfig, PipelineConfig
from grain.data.synthetic import build_world
from grain.evaluate.run import evaluate
from grain.shards import read_table
from grain.stages import eval_cache_dir, plan, synthetic_eval_samples, workdir_path
from grain.train.model import build_model, save_model


def plain_loop(model, samples: Path, classnames: list[str], label_of: dict[int, int], batch: int) -> dict[str, float]:
    import open_clip.tokenizer

    table = read_table(samples, columns=["image", "label"]).to_pylist()
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    feats = []
    with torch.no_grad():
        for start in range(0, len(table), batch):
            arrs = []
            for row in table[start : start + batch]:
                img = Image.open(io.BytesIO(row["image"])).convert("RGB").resize((model.image_size,) * 2, Image.BICUBIC)
                arrs.append(((np.asarray(img, np.float32) / 255 - mean) / std).transpose(2, 0, 1))
            feats.append(model.encode_image(torch.from_numpy(np.stack(arrs)))["image_embed"])
        image = torch.cat(feats)
        tok = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
        text = model.encode_text(tok([f"a photo of a {c}." for c in classnames]))
    labels = torch.tensor([label_of[r["label"]] for r in table])
    top = (image @ text.T).topk(min(5, len(classnames)), dim=1).indices
    return {"acc1": float((top[:, 0] == labels).float().mean()), "acc5": float((top == labels[:, None]).any(1).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--arch", default="grain-tiny")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="grain-evalbench-"))
    try:
        torch.manual_seed(0)
        model = build_model(args.arch).eval()
        save_model(model, root / "model")  # a given model (evaluate.model), not a train stage output
        cfg = PipelineConfig(
            workdir=str(root / "work"),
            evaluate=EvalConfig.model_validate({"model": str(root / "model"), "modes": ["names"],
                                                "batch_size": args.batch_size,
                                                "datasets": [{"name": "single", "kind": "synthetic", "split": "single",
                                                              "num_images": args.images}]}),
        )
        work = workdir_path(cfg)
        step = plan(cfg, "evaluate")
        # the stage ingests the split itself on first use (an ingest config derived from cfg.ingest.synthetic, written
        # to that config's samples/ folder); do it once up front so neither side pays for it
        ds = cfg.evaluate.datasets[0]
        syn = cfg.ingest.synthetic.model_copy(update={"split": ds.split, "num_images": ds.num_images})
        split_cfg = cfg.model_copy(update={"ingest": IngestConfig(source="synthetic", num_shards=2, synthetic=syn)})
        ingesting = plan(split_cfg, "ingest")
        samples = ingesting.out
        assert samples == synthetic_eval_samples(work, split_cfg.ingest)
        ingesting.stage.run(split_cfg, ingesting.inputs, samples)
        world = build_world(syn.seed, syn.num_seen_classes, syn.num_unseen_pairs)
        label_of = {world.class_names.index(c): i for i, c in enumerate(world.unseen)}
        times: dict[str, list[float]] = {"plain": [], "stage cold": [], "stage warm": []}
        for r in range(args.rounds):
            t0 = time.perf_counter()
            plain = plain_loop(model, samples, world.unseen, label_of, args.batch_size)
            times["plain"].append(time.perf_counter() - t0)
            shutil.rmtree(eval_cache_dir(work), ignore_errors=True)
            t0 = time.perf_counter()
            res = evaluate(cfg.evaluate, step.inputs["model"], step.out, workdir=work, synthetic=cfg.ingest.synthetic,
                           progress=False)
            times["stage cold"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            evaluate(cfg.evaluate, step.inputs["model"], step.out, workdir=work, synthetic=cfg.ingest.synthetic,
                     progress=False)
            times["stage warm"].append(time.perf_counter() - t0)
        ours = {row["metric"]: row["value"] for row in res.rows}
        print(f"{args.images} images ({args.arch}, batch {args.batch_size}, torch threads {torch.get_num_threads()}), "
              f"{args.rounds} rounds, median seconds:")
        med = {k: float(np.median(v)) for k, v in times.items()}
        for k, v in med.items():
            print(f"  {k:11s} {v:7.2f} s   (rounds: {' '.join(f'{x:.2f}' for x in times[k])})")
        print(f"stage cold / plain = {med['stage cold'] / med['plain']:.3f}; stage warm / plain = {med['stage warm'] / med['plain']:.3f}")
        print(f"same numbers: plain acc1 {plain['acc1']:.4f} acc5 {plain['acc5']:.4f}; stage acc1 {ours['acc1']:.4f} acc5 {ours['acc5']:.4f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
