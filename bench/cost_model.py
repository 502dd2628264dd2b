"""The cost model (grain.costs): FLOPs per image of every stage at paper scale, GPU-hours for CC3M and CC12M, and
the throughput of each stage measured on this machine.

1. **FLOPs** (FlopCounterMode on the meta device, nothing downloaded, no weights in memory): one training step of
   ``grain-vit-b16`` in ``grain`` mode (image + caption + 5 descriptions, batch 128) and in ``clip`` mode (the
   baseline), also with texts cut at 32 tokens (what grain's encode_text does to a batch of short texts); one
   OWLv2 B/16 forward pass at 960 px with 10 queries; the 7B VLM's describe requests from its config
   (grain.costs.QWEN2_VL_7B). The counts are compared with the stored ``grain.costs.PAPER_FLOPS`` (what reports
   print); a difference is printed as a warning.
2. **Measured here**: the main job's stages (ingest → describe → ground → train) on the default config, smaller
   (``--images``, ``--steps``), run through grain.stages.plan in a temporary workdir — reference describe and ground
   engines, grain-tiny on the CPU — plus the two real engines on tiny local random models (tests/support): OWLv2's
   ``OwlDetector.detect`` (no Ray) and the in-process transformers chat engine with a tiny Qwen2-VL (both requests
   per image, ``--vlm-tokens`` output tokens at most). Or, with ``--from-run``, the timings of a finished run
   (a report .md of the main job, or its workdir planned with the default config).
3. Writes ``--out`` (JSON: every number, the assumptions, machine, versions, commit, date) and prints the Markdown
   section the main job's report carries.

    .venv/bin/python bench/cost_model.py                                  # ≈ 1-2 min on 2 cores
    .venv/bin/python bench/cost_model.py --from-run runs/default          # timings of the main job's last run
    .venv/bin/python bench/cost_model.py --mfu-train 0.3 --out /tmp/cost.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tests/support: the tiny local OWLv2 and Qwen2-VL builders

from grain import costs, stages  # noqa: E402
from grain.config import load_config  # noqa: E402

TRAIN_STAGES = ("ingest", "describe", "ground", "train")


# ------------------------------------------------------------------------------------------------ FLOPs


def count_flops() -> dict[str, Any]:
    t0 = time.perf_counter()
    grain = costs.count_train_step_flops(mode="grain")
    clip = costs.count_train_step_flops(mode="clip")
    grain32 = costs.count_train_step_flops(mode="grain", text_tokens=32)
    clip32 = costs.count_train_step_flops(mode="clip", text_tokens=32)
    owl = costs.count_owlv2_flops()
    out = {"train_grain": grain, "train_clip": clip, "train_grain_text32": grain32, "train_clip_text32": clip32,
           "ground_owlv2": owl, "describe_vlm": costs.describe_flops_per_image(), "seconds": time.perf_counter() - t0}
    counted = {"train_grain": grain["flops_per_image"], "train_clip": clip["flops_per_image"],
               "train_grain_text32": grain32["flops_per_image"], "train_clip_text32": clip32["flops_per_image"],
               "ground_owlv2": owl["flops_per_image"]}
    out["counted"] = counted
    out["stale"] = {k: {"stored": costs.PAPER_FLOPS[k], "counted": v} for k, v in counted.items()
                    if abs(v - costs.PAPER_FLOPS[k]) > 1e-6 * v}
    return out


# ------------------------------------------------------------------------------------------------ measured here


def _timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_stages(root: Path, images: int, steps: int) -> tuple[dict[str, dict[str, Any]], dict[str, str], Any]:
    """The main job's stages, default config (smaller), in ``root``: summaries as flows/pipeline.py records them."""
    cfg = load_config(None, [f"workdir={root}", f"ingest.synthetic.num_images={images}", f"train.steps={steps}",
                             f"train.checkpoint_every={steps}", f"train.warmup_steps={max(1, steps // 10)}"])
    summaries: dict[str, dict[str, Any]] = {}
    for name in stages.pipeline_stages(cfg, "train"):
        step = stages.plan(cfg, name)
        opts = {"contact_sheet": False} if name == "ground" else {}
        summary, seconds = _timed(lambda step=step, opts=opts: step.stage.run(cfg, step.inputs, step.out, **opts))
        summary["wall_seconds"] = round(seconds, 3)
        summaries[name] = summary
        print(f"  {name}: {seconds:.1f} s", flush=True)
    engines = {"ingest": f"synthetic {cfg.ingest.synthetic.image_size} px", "describe": cfg.describe.engine,
               "ground": cfg.ground.engine, "train": f"{cfg.train.arch} {cfg.train.mode}, batch {cfg.train.batch_size}, CPU"}
    return summaries, engines, cfg


def _sample_rows(cfg: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` images with their descriptions (the ground stage's input rows)."""
    from grain.shards import read_table

    ground = stages.plan(cfg, "ground")
    samples = read_table(ground.inputs["samples"], columns=["uid", "image", "caption"]).to_pylist()[:n]
    described = read_table(ground.inputs["descriptions"], columns=["uid", "descriptions"]).to_pylist()
    texts = {r["uid"]: r["descriptions"] for r in described}
    return [{**r, "descriptions": texts.get(r["uid"]) or []} for r in samples]


def tiny_owl_engine(cfg: Any, root: Path, n: int) -> dict[str, Any]:
    """The real ground engine (OwlDetector.detect, batches of ground.batch_size) on a tiny local OWLv2."""
    from support.tiny_owl import IMAGE_SIZE, build_tiny_owlv2

    from grain.annotate.ground import OwlDetector
    from grain.config import GroundConfig

    model = build_tiny_owlv2(root / "tiny_owl", seed=0)
    gcfg = GroundConfig(engine="owlv2", model=str(model), threshold=0.0)
    detector = OwlDetector(gcfg)
    rows = _sample_rows(cfg, n)
    detector.detect(rows[: gcfg.batch_size])  # warm-up
    _, seconds = _timed(lambda: [detector.detect(rows[i : i + gcfg.batch_size]) for i in range(0, len(rows), gcfg.batch_size)])
    return {"stage": "ground", "images": len(rows), "seconds": seconds, "images_per_s": len(rows) / seconds,
            "reused": False, "engine": f"owlv2: OwlDetector, tiny random OWLv2 ({IMAGE_SIZE} px), batch {gcfg.batch_size}, no Ray"}


def tiny_vlm_engine(cfg: Any, root: Path, n: int, max_tokens: int) -> dict[str, Any]:
    """The real in-process describe engine (TransformersChatEngine) on a tiny local Qwen2-VL: both requests
    (descriptions, caption rewrite) per image, built the way the describe stage builds them."""
    from support.tiny_mllm import build_tiny_qwen2vl

    from grain.annotate.engines import TransformersChatEngine
    from grain.annotate.prompts import describe_messages, image_data_url, rewrite_messages

    model = build_tiny_qwen2vl(root / "tiny_vlm", seed=0)
    dcfg = cfg.describe.model_copy(update={"engine": "transformers", "model": str(model)})
    engine = TransformersChatEngine(dcfg)
    rows = _sample_rows(cfg, n)

    def requests(row: dict[str, Any]) -> list[Any]:
        url = image_data_url(row["image"], dcfg.image_max_side)
        return [describe_messages(url, dcfg.prompt), rewrite_messages(url, row["caption"], dcfg.rewrite_prompt)]

    engine.chat(requests(rows[0])[:1], max_tokens, 0.0)  # warm-up
    done, seconds = _timed(lambda: [engine.chat(requests(r), max_tokens, 0.0) for r in rows])
    tokens = sum(c.completion_tokens or 0 for batch in done for c in batch)
    return {"stage": "describe", "images": len(rows), "seconds": seconds, "images_per_s": len(rows) / seconds,
            "reused": False, "completion_tokens": tokens,
            "engine": f"transformers: tiny random Qwen2-VL, 2 requests/image, ≤ {max_tokens} new tokens each"}


# ------------------------------------------------------------------------------------------------ --from-run


_ROW = re.compile(r"^\| (\w+(?: \([\w-]+\))?) \| `([^`]+)` \|")


def folders_from(path: Path, overrides: list[str]) -> dict[str, Path]:
    """Stage label → output folder: from a main-job report (its stage table), or a workdir planned with the
    default config (+ ``overrides``), baselines included."""
    if path.is_file():
        found = {m.group(1): Path(m.group(2)) for line in path.read_text().splitlines() if (m := _ROW.match(line))}
        return {k: v for k, v in found.items() if k.split()[0] in TRAIN_STAGES}
    cfg = load_config(None, [f"workdir={path}", *overrides])
    out = {name: stages.plan(cfg, name).out for name in stages.pipeline_stages(cfg, "train")}
    for mode in cfg.baselines:
        if mode != cfg.train.mode:
            out[f"train ({mode})"] = stages.plan(load_config(None, [f"workdir={path}", *overrides, f"train.mode={mode}"]), "train").out
    return out


def summaries_from_folders(folders: dict[str, Path]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """What a finished stage folder says about its run: ``_SUCCESS.json`` (rows_in, rows_out, seconds) of a Parquet
    stage; ``summary.json`` (steps, seconds) + the batch size of ``_stage.json`` of a train folder. Also the engine
    (or arch and mode) of each, from its ``_stage.json`` config."""
    out: dict[str, dict[str, Any]] = {}
    engines: dict[str, str] = {}
    for label, folder in folders.items():
        header = folder / stages.STAGE_FILE
        config = json.loads(header.read_text()).get("config", {}) if header.exists() else {}
        if label.split()[0] == "train":
            summary = folder / stages.TRAIN_SUMMARY_FILE
            if summary.exists():
                s = json.loads(summary.read_text())
                out[label] = {"steps": s.get("steps"), "seconds": s.get("seconds"), "batch_size": config.get("batch_size")}
                engines[label] = f"{config.get('arch')} {config.get('mode')}, batch {config.get('batch_size')}"
        elif (folder / "_SUCCESS.json").exists():
            s = json.loads((folder / "_SUCCESS.json").read_text())
            out[label] = {"totals": {"rows_in": s.get("rows_in"), "rows_out": s.get("rows_out")},
                          "wall_seconds": s.get("seconds")}
            engines[label] = str(config.get("engine") or config.get("source") or "")
    return out, engines


# ------------------------------------------------------------------------------------------------ main


def machine() -> dict[str, Any]:
    import open_clip
    import torch
    import transformers

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "open_clip": open_clip.__version__, "commit": commit or None,
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "cost.json"), help="JSON file to write")
    ap.add_argument("--from-run", type=Path, default=None,
                    help="take the measured timings from a finished run (a report .md or a workdir) instead of running")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override for --from-run WORKDIR (as in grain --set)")
    ap.add_argument("--images", type=int, default=600, help="synthetic images for the measured stages")
    ap.add_argument("--steps", type=int, default=40, help="training steps for the measured train stage")
    ap.add_argument("--engine-images", type=int, default=64, help="images for the tiny OWLv2 engine")
    ap.add_argument("--vlm-images", type=int, default=4, help="images for the tiny Qwen2-VL engine")
    ap.add_argument("--vlm-tokens", type=int, default=64, help="max new tokens per tiny Qwen2-VL request")
    ap.add_argument("--no-engines", action="store_true", help="skip the tiny OWLv2 / Qwen2-VL engine timings")
    for field, help_ in (("mfu_train", "train"), ("mfu_ground", "OWLv2 inference"), ("mfu_prefill", "VLM prefill"),
                         ("mfu_decode", "VLM decode")):
        ap.add_argument(f"--{field.replace('_', '-')}", type=float, default=getattr(costs.Assumptions(), field),
                        help=f"MFU assumed for {help_}")
    args = ap.parse_args()
    assumptions = costs.Assumptions(mfu_train=args.mfu_train, mfu_ground=args.mfu_ground,
                                    mfu_prefill=args.mfu_prefill, mfu_decode=args.mfu_decode)
    t0 = time.perf_counter()
    print("counting FLOPs (meta device) ...", flush=True)
    flops = count_flops()
    for key, v in flops["stale"].items():
        print(f"WARNING: grain.costs.PAPER_FLOPS[{key!r}] = {v['stored']:.0f} but the code counts {v['counted']:.0f}; "
              "update the table", flush=True)
    result = costs.cost_model(assumptions, counted=flops["counted"])

    measured: dict[str, dict[str, Any]]
    if args.from_run is not None:
        summaries, engines = summaries_from_folders(folders_from(args.from_run, args.overrides))
        measured = costs.measured_throughput(summaries, engines=engines)
        source = f"finished run {args.from_run}"
    else:
        root = Path(tempfile.mkdtemp(prefix="grain-cost-"))
        try:
            print(f"running the stages ({args.images} images, {args.steps} train steps) in {root} ...", flush=True)
            summaries, engines, cfg = run_stages(root, args.images, args.steps)
            measured = costs.measured_throughput(summaries, batch_size=cfg.train.batch_size, engines=engines)
            if not args.no_engines:
                print("tiny engines ...", flush=True)
                with contextlib.redirect_stderr(io.StringIO()):  # progress bars of save_pretrained
                    measured["ground (owlv2 engine)"] = tiny_owl_engine(cfg, root, args.engine_images)
                    measured["describe (transformers engine)"] = tiny_vlm_engine(cfg, root, args.vlm_images, args.vlm_tokens)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        source = f"this bench: default config, {args.images} images, {args.steps} train steps"
    mach = machine()
    lines = costs.markdown_lines(result, measured, heading="##",
                                 machine=f"{mach['cpu']}, {mach['cores']} cores, torch threads {mach['torch_threads']}")
    days = {k: costs.at_scale_days(measured, v["images"], assumptions.epochs) for k, v in result["estimates"].items()}
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": mach,
        "seconds": time.perf_counter() - t0, "flops": flops, "cost_model": result,
        "measured": {"source": source, "stages": measured, "days_at_scale": days}, "markdown": "\n".join(lines),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    if out.name == "cost.json":  # a results folder (docs/results/): regenerate its report with this section
        from grain.evaluate.science import render_report

        print(f"updated {render_report(out.parent.with_suffix('.md'))}", flush=True)
    print()
    print("\n".join(lines))
    print()
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
