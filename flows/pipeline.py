"""Prefect flows: one per stage (`grain-ingest`, `grain-describe`, `grain-ground`, `grain-train`, `grain-evaluate`)
and the full pipeline `grain` (its deployment `full-pipeline` is what users start:
`prefect deployment run grain/full-pipeline`).

Flows take a config path plus dotted overrides (the same as every CLI command) and pass folder paths between
stages. Each stage flow runs one thin task that calls the stage function in grain.pipeline. Caching: the task's
cache key is the stage's output folder (named by its fingerprint) — but only when that folder already holds a
complete output; an incomplete folder gives no key, so the task runs and the stage resumes at its first unfinished
shard. Retries only where they can help (describe/ground engines over the network), never on bad input
(config errors are raised before anything runs).

Dashboard: each stage task publishes a live progress artifact (shards done / total, updated as shards commit) and a
table artifact of its counts; the full flow ends with a Markdown report artifact (config summary, per-stage counts
and timings, the eval table, paths of the contact sheet and loss curve PNGs).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.runtime import task_run

from grain import pipeline as P
from grain.config import PipelineConfig, load_config


def _config(config: str | None, overrides: list[str] | None) -> PipelineConfig:
    return load_config(config, overrides or [])


def _target(stage: str, cfg: PipelineConfig, params: dict[str, Any]) -> Path:
    if stage == "ingest":
        return P.samples_dir(cfg)
    if stage == "describe":
        return P.descriptions_dir(cfg, params["samples"])
    if stage == "ground":
        return P.regions_dir(cfg, params["samples"], params["descriptions"])
    if stage == "train":
        return P.train_dir(cfg, params["samples"], params["descriptions"], params["regions"])
    return P.eval_dir(cfg, params["model"])


def _cache_key(stage: str):
    """Key = the stage's output folder (its name is the stage fingerprint)."""

    def key(context: Any, params: dict[str, Any]) -> str | None:
        try:
            target = _target(stage, _config(params["config"], params["overrides"]), params)
        except Exception:  # noqa: BLE001 - inputs not ready: no cache; the task itself raises the real error
            return None
        return f"grain-{stage}-{target.parent.name}-{target.name}"

    return key


def _submit(stage: str, task_fn: Any, cfg: PipelineConfig, params: dict[str, Any]) -> dict[str, Any]:
    """Run a stage task; a cached result counts only while the output folder is complete — otherwise the cache is
    refreshed, i.e. the task runs (and the stage resumes at its first unfinished shard)."""
    target = _target(stage, cfg, params)
    fn = task_fn if P.is_finished(stage, target) else task_fn.with_options(refresh_cache=True)
    return fn(**params)


def _run_name(stage: str):
    def name() -> str:
        params = task_run.parameters
        try:
            target = _target(stage, _config(params["config"], params["overrides"]), params)
            return f"{stage} {target.parent.name}/{target.name}"
        except Exception:  # noqa: BLE001
            return stage

    return name


class _Progress:
    """A Prefect progress artifact per stage, updated from grain.shards' progress listener."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.id = create_progress_artifact(progress=0.0, key=f"{stage}-progress", description=f"{stage}: shards done")

    def __call__(self, stage: str, out_dir: Path, done: int, total: int) -> None:
        if total:
            update_progress_artifact(self.id, progress=100.0 * done / total,
                                     description=f"{stage}: {done}/{total} shards in {out_dir}")


def _stage_table(stage: str, summary: dict[str, Any]) -> None:
    keep = {k: v for k, v in summary.items() if not isinstance(v, (list, dict)) or k in ("quarantined",)}
    rows = [{"key": k, "value": json.dumps(v) if isinstance(v, (dict, list)) else str(v)} for k, v in sorted(keep.items())]
    create_table_artifact(table=rows, key=f"{stage}-stats", description=f"{stage}: counts and timings")


def _run_stage(stage: str, fn, *args: Any) -> dict[str, Any]:
    from grain.shards import progress_listener

    t0 = time.perf_counter()
    with progress_listener(_Progress(stage)):
        summary = fn(*args)
    summary["wall_seconds"] = round(time.perf_counter() - t0, 3)
    _stage_table(stage, summary)
    get_run_logger().info("%s -> %s (%.1f s)", stage, summary["out"], summary["wall_seconds"])
    return summary


# ------------------------------------------------------------------------------------------------ tasks (thin)


@task(name="ingest", task_run_name=_run_name("ingest"), cache_key_fn=_cache_key("ingest"), persist_result=True)
def ingest_task(config: str | None, overrides: list[str]) -> dict[str, Any]:
    return _run_stage("ingest", P.run_ingest, _config(config, overrides))


@task(name="describe", task_run_name=_run_name("describe"), cache_key_fn=_cache_key("describe"), persist_result=True,
      retries=2, retry_delay_seconds=30)
def describe_task(config: str | None, overrides: list[str], samples: str) -> dict[str, Any]:
    return _run_stage("describe", P.run_describe, _config(config, overrides), samples)


@task(name="ground", task_run_name=_run_name("ground"), cache_key_fn=_cache_key("ground"), persist_result=True,
      retries=1, retry_delay_seconds=30)
def ground_task(config: str | None, overrides: list[str], samples: str, descriptions: str) -> dict[str, Any]:
    return _run_stage("ground", P.run_ground, _config(config, overrides), samples, descriptions)


@task(name="train", task_run_name=_run_name("train"), cache_key_fn=_cache_key("train"), persist_result=True)
def train_task(config: str | None, overrides: list[str], samples: str, descriptions: str | None, regions: str | None,
               launcher: str = "local") -> dict[str, Any]:
    summary = _run_stage("train", P.run_train, _config(config, overrides), samples, descriptions, regions, launcher)
    _loss_curve(Path(summary["out"]))
    return summary


@task(name="evaluate", task_run_name=_run_name("evaluate"), cache_key_fn=_cache_key("evaluate"), persist_result=True)
def evaluate_task(config: str | None, overrides: list[str], model: str) -> dict[str, Any]:
    summary = _run_stage("evaluate", P.run_evaluate, _config(config, overrides), model)
    rows = summary.pop("rows")
    create_table_artifact(table=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                          key="eval-results", description="zero-shot results (value in [0, 1])")
    return summary


def _loss_curve(run_dir: Path) -> None:
    """<run>/loss_curve.png from metrics.jsonl (linked from the report)."""
    from grain.train.plot import loss_curve_png

    loss_curve_png(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")


# ------------------------------------------------------------------------------------------------ stage flows


@flow(name="grain-ingest")
def ingest_flow(config: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    cfg = _config(config, overrides)  # config errors fail here, before any task
    return _submit("ingest", ingest_task, cfg, {"config": config, "overrides": overrides or []})


@flow(name="grain-describe")
def describe_flow(config: str | None = None, overrides: list[str] | None = None, samples: str | None = None) -> dict[str, Any]:
    cfg = _config(config, overrides)
    return _submit("describe", describe_task, cfg,
                   {"config": config, "overrides": overrides or [], "samples": samples or str(P.samples_dir(cfg))})


@flow(name="grain-ground")
def ground_flow(config: str | None = None, overrides: list[str] | None = None, samples: str | None = None,
                descriptions: str | None = None) -> dict[str, Any]:
    cfg = _config(config, overrides)
    samples = samples or str(P.samples_dir(cfg))
    descriptions = descriptions or str(P.descriptions_dir(cfg, samples))
    return _submit("ground", ground_task, cfg,
                   {"config": config, "overrides": overrides or [], "samples": samples, "descriptions": descriptions})


@flow(name="grain-train")
def train_flow(config: str | None = None, overrides: list[str] | None = None, samples: str | None = None,
               descriptions: str | None = None, regions: str | None = None, launcher: str = "local") -> dict[str, Any]:
    cfg = _config(config, overrides)
    samples = samples or str(P.samples_dir(cfg))
    descriptions = descriptions or str(P.descriptions_dir(cfg, samples))
    regions = regions or str(P.regions_dir(cfg, samples, descriptions))
    return _submit("train", train_task, cfg, {"config": config, "overrides": overrides or [], "samples": samples,
                                              "descriptions": descriptions, "regions": regions, "launcher": launcher})


@flow(name="grain-evaluate")
def evaluate_flow(config: str | None = None, overrides: list[str] | None = None, model: str | None = None) -> dict[str, Any]:
    cfg = _config(config, overrides)
    if model is None:
        samples = P.samples_dir(cfg)
        descriptions = P.descriptions_dir(cfg, samples)
        model = str(P.train_dir(cfg, samples, descriptions, P.regions_dir(cfg, samples, descriptions)) / "model")
    return _submit("evaluate", evaluate_task, cfg, {"config": config, "overrides": overrides or [], "model": model})


@flow(name="grain")
def full_pipeline(config: str | None = None, overrides: list[str] | None = None, launcher: str = "local") -> dict[str, Any]:
    """ingest → describe → ground → train → evaluate → report, each stage a subflow; returns the report's path."""
    cfg = _config(config, overrides)
    overrides = overrides or []
    t0 = time.perf_counter()
    s = ingest_flow(config, overrides)
    d = describe_flow(config, overrides, s["out"])
    g = ground_flow(config, overrides, s["out"], d["out"])
    t = train_flow(config, overrides, s["out"], d["out"], g["out"], launcher)
    e = evaluate_flow(config, overrides, t["model"])
    report = write_report(cfg, {"ingest": s, "describe": d, "ground": g, "train": t, "evaluate": e},
                          time.perf_counter() - t0)
    return {"report": str(report), "eval": e["out"], "model": t["model"]}


def write_report(cfg: PipelineConfig, stages: dict[str, dict[str, Any]], seconds: float) -> Path:
    """<workdir>/reports/<eval fp>.md + a Markdown artifact: config summary, per-stage counts/timings, eval table."""
    from grain.evaluate.run import TABLE_FILE

    eval_dir = Path(stages["evaluate"]["out"])
    lines = ["# grain pipeline report", "",
             f"workdir `{cfg.workdir}`; ingest `{cfg.ingest.source}`; describe `{cfg.describe.engine}`; "
             f"ground `{cfg.ground.engine}`; train `{cfg.train.mode}` / `{cfg.train.arch}` × {cfg.train.steps} steps; "
             f"total {seconds:.1f} s", "", "| stage | output | wall s | counts |", "|---|---|---|---|"]
    for name, st in stages.items():
        counts = {k: st[k] for k in ("steps", "bad_steps", "encoded", "cached") if k in st}
        totals = st.get("totals") or {}
        counts.update({k: totals[k] for k in ("rows_in", "rows_out") if k in totals})
        lines.append(f"| {name} | `{st['out']}` | {st.get('wall_seconds', '')} | {json.dumps(counts)} |")
    lines += ["", (eval_dir / TABLE_FILE).read_text() if (eval_dir / TABLE_FILE).exists() else "(no eval table)", ""]
    curve = Path(stages["train"]["out"]) / "loss_curve.png"
    lines.append(f"Loss curve: `{curve}`" + ("" if curve.exists() else " (missing)"))
    sheet = stages["ground"].get("contact_sheet")
    if sheet:
        lines.append(f"Contact sheet (boxes of the ground stage): `{sheet}`")
    text = "\n".join(lines) + "\n"
    out = Path(cfg.workdir) / "reports" / f"{eval_dir.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    create_markdown_artifact(markdown=text, key="grain-report", description="grain pipeline report")
    return out


ALL_FLOWS = {"full-pipeline": full_pipeline, "ingest": ingest_flow, "describe": describe_flow, "ground": ground_flow,
             "train": train_flow, "evaluate": evaluate_flow}
