"""Where each stage of a config writes, whether it is finished, and one call per stage — shared by the CLI and
the Prefect flows (flows/ adds orchestration only; nothing here imports Prefect).

Stage folders are named by fingerprints that depend on the upstream folders' fingerprints, so a stage's folder is
known once its inputs exist: ``samples_dir(cfg)`` always, ``descriptions_dir(cfg, samples)`` once samples/ is
complete, and so on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from grain.config import PipelineConfig
from grain.shards import is_complete, stage_dir

STAGES = ("ingest", "describe", "ground", "train", "evaluate")


def samples_dir(cfg: PipelineConfig) -> Path:
    from grain.data.ingest import ingest_fingerprint

    return stage_dir(cfg.workdir, "samples", ingest_fingerprint(cfg.ingest))


def descriptions_dir(cfg: PipelineConfig, samples: str | Path) -> Path:
    from grain.annotate.describe import describe_fingerprint

    return stage_dir(cfg.workdir, "descriptions", describe_fingerprint(cfg.describe, samples))


def regions_dir(cfg: PipelineConfig, samples: str | Path, descriptions: str | Path) -> Path:
    from grain.annotate.ground import ground_fingerprint

    return stage_dir(cfg.workdir, "regions", ground_fingerprint(cfg.ground, samples, descriptions))


def train_needs(cfg: PipelineConfig) -> tuple[bool, bool]:
    """(descriptions/, regions/) needed by the train mode: clip reads no regions, and no descriptions unless it
    trains on caption rewrites."""
    return cfg.train.mode != "clip" or cfg.train.rewrite_prob > 0, cfg.train.mode != "clip"


def train_inputs(cfg: PipelineConfig, samples: str | Path, descriptions: str | Path | None,
                 regions: str | Path | None) -> tuple[Path, Path | None, Path | None]:
    """The folders the train mode reads (see :func:`train_needs`)."""
    needs_desc, needs_regions = train_needs(cfg)
    return (Path(samples), Path(descriptions) if needs_desc and descriptions else None,
            Path(regions) if needs_regions and regions else None)


def train_dir(cfg: PipelineConfig, samples: str | Path, descriptions: str | Path | None, regions: str | Path | None) -> Path:
    from grain.train.loop import train_fingerprint

    s, d, r = train_inputs(cfg, samples, descriptions, regions)
    return stage_dir(cfg.workdir, "train", train_fingerprint(cfg.train, s, d, r))


def eval_dir(cfg: PipelineConfig, model_dir: str | Path) -> Path:
    from grain.evaluate.run import eval_fingerprint
    from grain.evaluate.zeroshot import model_hash

    return stage_dir(cfg.workdir, "eval", eval_fingerprint(cfg.evaluate, model_hash(model_dir)))


def is_finished(stage: str, folder: str | Path) -> bool:
    """True when ``folder`` holds the complete output of ``stage`` (what a cache may rely on)."""
    folder = Path(folder)
    if stage == "train":
        return (folder / "summary.json").exists() and (folder / "model" / "grain_model.json").exists()
    if stage == "evaluate":
        return (folder / "results.parquet").exists() and (folder / "summary.json").exists()
    return is_complete(folder)


# ------------------------------------------------------------------------------------------------ one call per stage


def run_ingest(cfg: PipelineConfig, progress: bool = False) -> dict[str, Any]:
    from grain.data.ingest import ingest
    from grain.shards import result_summary

    out = samples_dir(cfg)
    return {"out": str(out), **result_summary(ingest(cfg.ingest, out, progress=progress))}


def run_describe(cfg: PipelineConfig, samples: str | Path, progress: bool = False) -> dict[str, Any]:
    from grain.annotate.describe import describe
    from grain.shards import result_summary

    out = descriptions_dir(cfg, samples)
    return {"out": str(out), **result_summary(describe(cfg.describe, samples, out, ray_cfg=cfg.ray, progress=progress))}


def run_ground(cfg: PipelineConfig, samples: str | Path, descriptions: str | Path, progress: bool = False) -> dict[str, Any]:
    from grain.annotate.ground import ground
    from grain.shards import result_summary

    out = regions_dir(cfg, samples, descriptions)
    summary = {"out": str(out),
               **result_summary(ground(cfg.ground, samples, descriptions, out, ray_cfg=cfg.ray, progress=progress))}
    summary["contact_sheet"] = str(contact_sheet(cfg, samples, out))
    return summary


def contact_sheet(cfg: PipelineConfig, samples: str | Path, regions: str | Path) -> Path:
    """<workdir>/inspect/<regions fp>.png: 16 images with their boxes (the ground stage's visual QA)."""
    from grain.annotate.inspect_sheet import render_contact_sheet

    target = Path(cfg.workdir) / "inspect" / f"{Path(regions).name}.png"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        render_contact_sheet(samples, regions, target)
    return target


def run_train(cfg: PipelineConfig, samples: str | Path, descriptions: str | Path | None, regions: str | Path | None,
              launcher: str = "local", progress: bool = False) -> dict[str, Any]:
    from grain.shards import read_json
    from grain.train.loop import SUMMARY_FILE, train

    s, d, r = train_inputs(cfg, samples, descriptions, regions)
    out = train_dir(cfg, s, d, r)
    if launcher == "ray":
        from grain.train.launch import train_with_ray

        train_with_ray(cfg.train, cfg.ray, s, d, r, out)
    else:
        train(cfg.train, s, d, r, out, progress=progress)
    return {"out": str(out), "model": str(out / "model"), **read_json(out / SUMMARY_FILE)}


def run_evaluate(cfg: PipelineConfig, model_dir: str | Path, progress: bool = False) -> dict[str, Any]:
    from grain.evaluate.run import evaluate

    out = eval_dir(cfg, model_dir)
    result = evaluate(cfg.evaluate, model_dir, out, workdir=cfg.workdir, synthetic=cfg.ingest.synthetic, progress=progress)
    return {"out": str(out), "rows": result.rows, "skipped": result.skipped, "seconds": result.seconds,
            "encoded": result.encoded, "cached": result.cached}
