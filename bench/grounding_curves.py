"""Does the grounding learn? Train on the synthetic world and probe every checkpoint (CPU science benchmark).

For each preset it trains ``--steps`` steps (checkpoint every ``--every``), then runs grain.train.probe on a
held-out split (the synthetic world's distractor split: new images of unseen classes, none trained on) and prints one
row per checkpoint: the training batch's matched GIoU and L_rd accuracy (from metrics.jsonl) and the held-out
probes — best-query GIoU vs the static baseline (boxes predicted for another image), the GIoU of the box the model
picks for a description by embedding similarity, and the region→description agreement.

Every folder is the one grain.stages.plan names under the workdir (--out, or a temp folder): the two synthetic
worlds (train split and held-out split, reference describe and ground) go through the ingest, describe and ground
stages into samples/, descriptions/ and regions/<fingerprint>, and each preset trains into train/<fingerprint> (the
train stage's folder for that preset's train config, reading the inputs the registry plans for --mode).

    .venv/bin/python bench/grounding_curves.py --steps 800 --every 100 --presets paper small-scale
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from grain.config import DescribeConfig, GroundConfig, IngestConfig, PipelineConfig, SyntheticConfig, TrainConfig
from grain.stages import pipeline_stages, plan
from grain.train.checkpoint import list_checkpoints
from grain.train.loop import train
from grain.train.model import load_model
from grain.train.probe import grounding_probe

PRESETS = {
    # the paper's decoder: 5 free learned queries, image tokens as keys without positions
    "paper": {"decoder": {"query_type": "learned", "memory_pos": "none"}},
    # what learns at CPU scale: one query per patch starting from its token, anchored at the patch centre
    "small-scale": {"decoder": {"query_type": "patches", "memory_pos": "sine"}},
    "anchored16": {"decoder": {"query_type": "anchored", "num_region_queries": 16, "memory_pos": "sine"}},
}


def world_config(root: Path, split: str, n: int) -> PipelineConfig:
    """A synthetic world: ``n`` images of ``split``, described and grounded by the reference engines."""
    return PipelineConfig(workdir=str(root), ingest=IngestConfig(num_shards=4, synthetic=SyntheticConfig(split=split, num_images=n)),
                          describe=DescribeConfig(engine="reference"), ground=GroundConfig(engine="reference"))


def make_world(cfg: PipelineConfig) -> tuple[Path, Path, Path]:
    """Run ingest, describe and ground for ``cfg`` into their planned folders; (samples, descriptions, regions)."""
    for name in pipeline_stages(cfg, "ground"):
        step = plan(cfg, name)
        step.stage.run(cfg, step.inputs, step.out, **({"contact_sheet": False} if name == "ground" else {}))
    grounding = plan(cfg, "ground")
    return grounding.inputs["samples"], grounding.inputs["descriptions"], grounding.out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--images", type=int, default=3000, help="training images (synthetic train split, seed 0)")
    ap.add_argument("--arch", default="grain-tiny")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--mode", default="grain")
    ap.add_argument("--presets", nargs="+", default=["paper", "small-scale"], choices=sorted(PRESETS))
    ap.add_argument("--probe-batches", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="keep runs here (default: a temp folder)")
    args = ap.parse_args()

    root = args.out or Path(tempfile.mkdtemp(prefix="grain-grounding-"))
    world = world_config(root, "train", args.images)
    make_world(world)
    # held out: the distractor split — new images of unseen classes (new part combinations), two creatures each
    held = make_world(world_config(root, "distractor", 256))

    for preset in args.presets:
        cfg = world.model_copy(update={"train": TrainConfig(
            mode=args.mode, arch=args.arch, arch_overrides=PRESETS[preset], steps=args.steps, batch_size=args.batch_size,
            checkpoint_every=args.every, keep_last=10_000, log_every=args.every)})
        training = plan(cfg, "train")  # inputs: those --mode reads, from the world's planned folders
        out = training.out
        t0 = time.perf_counter()
        train(cfg.train, *(training.inputs.get(k) for k in ("samples", "descriptions", "regions")), out, resume=None,
              progress=False, export=False)
        seconds = time.perf_counter() - t0
        metrics = {m["step"]: m for m in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines())}
        print(f"\n== preset {preset}: {json.dumps(PRESETS[preset])}, mode {args.mode}, {args.arch}, "
              f"{args.steps} steps x batch {args.batch_size} in {seconds:.0f} s")
        print("step | train matched_giou | train rd_acc | held-out best_query_giou | static_giou | text_query_giou | text_rd_acc")
        for ck in list_checkpoints(out / "checkpoints"):
            step = int(ck.name.split("_")[1])
            probe = grounding_probe(load_model(ck), *held, batches=args.probe_batches, seed=777)
            m = metrics.get(step, {})
            print(f"{step:5d} | {m.get('matched_giou', float('nan')):18.3f} | {m.get('rd_acc', float('nan')):12.3f} | "
                  f"{probe['best_query_giou']:24.3f} | {probe['static_giou']:11.3f} | {probe['text_query_giou']:15.3f} | "
                  f"{probe['text_rd_acc']:11.3f}")
    print(f"\n(runs kept under {root})")


if __name__ == "__main__":
    main()
