"""Prefect flows: one per stage (`grain-ingest`, `grain-describe`, `grain-ground`, `grain-train`, `grain-evaluate`)
and the full pipeline `grain` (its deployment `full-pipeline` is what users start:
`prefect deployment run grain/full-pipeline`).

Orchestration only: which folders a stage reads and writes, and when its output is finished, come from the stage
registry (grain.stages); each stage flow plans its stage once and runs one task that calls the stage's ``run`` with
folder paths and returns a summary with its output folder.

Parameters (the same for every flow): ``config`` (a YAML path, or none for the built-in default),
``base_overrides`` (the deployment's own ``--set`` values, fixed by `grain serve` or prefect.yaml) and ``overrides``
(what a run adds on top: ``--param 'overrides=["train.steps=40"]'``); later overrides win. A stage flow's input
folders default to the ones its config plans; inputs that are not finished yet are produced first by running the
upstream stage flows (a `grain-train` run on an empty workdir ingests first; a ``clip`` run without caption
rewrites never runs describe or ground).

Caching: a task's cache key is its output folder (named by the stage fingerprint); the cached result counts only
while that folder holds a finished output, otherwise the cache is refreshed and the stage resumes at its first
unfinished shard (training: its last checkpoint). Retries only where they can help (describe/ground engines over a
network), never on bad input. Stage subflows run without Prefect's flow heartbeat (the parent flow's heartbeat
covers the same process; the heartbeat thread sleeps in one-second steps and would add up to a second to every
subflow's end).

Dashboard: each stage task publishes a live progress artifact (shards done / total) and a table of its counts; the
full flow ends with a Markdown report artifact and an ``eval-results`` table.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.runtime import task_run
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from grain import stages
from grain.config import PipelineConfig, load_config
from grain.locks import entry_lock
from grain.shards import write_text_atomic


def _config(config: str | None, base_overrides: list[str] | None, overrides: list[str] | None) -> PipelineConfig:
    return load_config(config, [*(base_overrides or []), *(overrides or [])])


# ------------------------------------------------------------------------------------------------ the stage task


def _cache_key(context: Any, params: dict[str, Any]) -> str:
    """The output folder (its name is the stage fingerprint; the absolute path keeps workdirs apart)."""
    return f"grain-{params['stage']}-{hashlib.sha256(params['out'].encode()).hexdigest()[:20]}"


def _task_run_name() -> str:
    params = task_run.parameters
    out = Path(params["out"])
    return f"{params['stage']} {out.parent.name}/{out.name}"


class _Progress:
    """A Prefect progress artifact per stage, updated from grain.shards' progress listener."""

    def __init__(self, stage: str) -> None:
        self.id = create_progress_artifact(progress=0.0, key=f"{stage}-progress", description=f"{stage}: shards done")

    def __call__(self, stage: str, out_dir: Path, done: int, total: int) -> None:
        if total:
            update_progress_artifact(self.id, progress=100.0 * done / total,
                                     description=f"{stage}: {done}/{total} shards in {out_dir}")


@task(cache_key_fn=_cache_key, task_run_name=_task_run_name, persist_result=True)
def stage_task(stage: str, config: dict[str, Any], inputs: dict[str, str], out: str,
               options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one stage (grain.stages) on its input folders into ``out``; returns its summary."""
    from grain.shards import progress_listener

    cfg = PipelineConfig.model_validate(config)
    t0 = time.perf_counter()
    with progress_listener(_Progress(stage)):
        summary = stages.get(stage).run(cfg, {k: Path(v) for k, v in inputs.items()}, Path(out), **(options or {}))
    summary["wall_seconds"] = round(time.perf_counter() - t0, 3)
    _stage_table(stage, summary)
    if stage == "evaluate":
        create_table_artifact(table=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                     for r in summary["rows"]],
                              key="eval-results", description="zero-shot results (value in [0, 1])")
    get_run_logger().info("%s -> %s (%.1f s)", stage, summary["out"], summary["wall_seconds"])
    return summary


#: The stage task per stage: named after the stage, with the stage's retries.
def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """A stage in which no row succeeded (grain.stages.NothingSucceeded) fails the same way on a retry: not retried."""
    try:
        state.result()
    except stages.NothingSucceeded:
        return False
    except Exception:  # noqa: BLE001 - any other failure: the stage's retries apply
        return True
    return True


TASKS = {name: stage_task.with_options(name=name, retries=s.flow_retries, retry_delay_seconds=30 if s.flow_retries else 0,
                                       retry_condition_fn=_worth_retrying)
         for name, s in stages.STAGES.items()}


def _stage_table(stage: str, summary: dict[str, Any]) -> None:
    keep = {k: v for k, v in summary.items() if not isinstance(v, (list, dict)) or k in ("quarantined", "totals")}
    rows = [{"key": k, "value": json.dumps(v) if isinstance(v, (dict, list)) else str(v)} for k, v in sorted(keep.items())]
    create_table_artifact(table=rows, key=f"{stage}-stats", description=f"{stage}: counts and timings")


# ------------------------------------------------------------------------------------------------ stage flows


def _subflow(fn: Callable[..., dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """Run a stage flow as a subflow, without its own heartbeat thread (see the module docstring)."""
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return fn(**kwargs)


def _run_stage_flow(stage: str, config: str | None, overrides: list[str] | None, base_overrides: list[str] | None,
                    given: dict[str, str | None], **options: Any) -> dict[str, Any]:
    """Plan ``stage`` (producing unfinished inputs first), then run its task — Cached when its output is finished."""
    cfg = _config(config, base_overrides, overrides)  # config errors fail here, before any task
    given = {k: v for k, v in given.items() if v is not None}
    for name in stages.get(stage).needs(cfg):
        if name in given or (name == "model" and cfg.evaluate.model):
            continue
        producer = stages.PRODUCER[name]
        up = stages.plan(cfg, producer, given)
        if not up.finished:
            summary = _subflow(FLOWS[producer], config=config, overrides=overrides, base_overrides=base_overrides,
                               **{k: v for k, v in given.items() if k in stages.get(producer).inputs},
                               **({"launcher": options["launcher"]} if producer == "train" and "launcher" in options else {}))
            given[name] = summary["model"] if name == "model" else summary["out"]
    step = stages.plan(cfg, stage, given)
    finished = step.finished  # before the task runs (the property looks at the folder each time)
    fn = TASKS[stage] if finished else TASKS[stage].with_options(refresh_cache=True)
    summary = fn(stage=stage, config=cfg.model_dump(mode="json"), inputs={k: str(v) for k, v in step.inputs.items()},
                 out=str(step.out), options=options or None)
    return {**summary, "reused": finished}  # True: this run did no work for the stage (its task was Cached)


@flow(name="grain-ingest")
def ingest_flow(config: str | None = None, overrides: list[str] | None = None,
                base_overrides: list[str] | None = None) -> dict[str, Any]:
    """Ingest image-caption data into samples/."""
    return _run_stage_flow("ingest", config, overrides, base_overrides, {})


@flow(name="grain-describe")
def describe_flow(config: str | None = None, overrides: list[str] | None = None, base_overrides: list[str] | None = None,
                  samples: str | None = None) -> dict[str, Any]:
    """Region descriptions for every image (descriptions/)."""
    return _run_stage_flow("describe", config, overrides, base_overrides, {"samples": samples})


@flow(name="grain-ground")
def ground_flow(config: str | None = None, overrides: list[str] | None = None, base_overrides: list[str] | None = None,
                samples: str | None = None, descriptions: str | None = None) -> dict[str, Any]:
    """A box for every description (regions/)."""
    return _run_stage_flow("ground", config, overrides, base_overrides, {"samples": samples, "descriptions": descriptions})


@flow(name="grain-train")
def train_flow(config: str | None = None, overrides: list[str] | None = None, base_overrides: list[str] | None = None,
               samples: str | None = None, descriptions: str | None = None, regions: str | None = None,
               launcher: str = "local") -> dict[str, Any]:
    """Train the GRAIN model or a baseline (reads only the folders train.mode needs)."""
    return _run_stage_flow("train", config, overrides, base_overrides,
                           {"samples": samples, "descriptions": descriptions, "regions": regions}, launcher=launcher)


@flow(name="grain-evaluate")
def evaluate_flow(config: str | None = None, overrides: list[str] | None = None, base_overrides: list[str] | None = None,
                  model: str | None = None) -> dict[str, Any]:
    """Zero-shot classification and retrieval of a model (default: this config's trained model)."""
    return _run_stage_flow("evaluate", config, overrides, base_overrides, {"model": model})


FLOWS: dict[str, Callable[..., dict[str, Any]]] = {"ingest": ingest_flow, "describe": describe_flow,
                                                  "ground": ground_flow, "train": train_flow,
                                                  "evaluate": evaluate_flow}


@flow(name="grain")
def full_pipeline(config: str | None = None, overrides: list[str] | None = None, base_overrides: list[str] | None = None,
                  launcher: str = "local") -> dict[str, Any]:
    """ingest → describe → ground → train → evaluate → report (the stages this config needs), each a subflow."""
    cfg = _config(config, base_overrides, overrides)
    stages.preflight(cfg, "evaluate")  # settings that cannot serve the input: one error before any task
    common = {"config": config, "overrides": overrides, "base_overrides": base_overrides}
    t0 = time.perf_counter()
    outs: dict[str, str] = {}
    summaries: dict[str, dict[str, Any]] = {}
    for name in stages.pipeline_stages(cfg):
        extra = {k: outs[k] for k in stages.get(name).needs(cfg) if k in outs}
        if name == "train":
            extra["launcher"] = launcher
        summary = _subflow(FLOWS[name], **common, **extra)
        summaries[name] = summary
        for key, producer in stages.PRODUCER.items():
            if producer == name:
                outs[key] = summary["model"] if key == "model" else summary["out"]
    compared: dict[str, dict[str, Any]] = {}
    for mode in cfg.baselines:  # the same data, towers and steps; only train.mode differs
        if mode == cfg.train.mode or cfg.evaluate.model:
            continue
        extra_overrides = [*(overrides or []), f"train.mode={mode}"]
        base = {**common, "overrides": extra_overrides}
        data = {k: outs[k] for k in ("samples", "descriptions", "regions") if k in outs}
        trained = _subflow(train_flow, **base, **data, launcher=launcher)  # it reads only what its mode needs
        compared[mode] = {"train": trained, "evaluate": _subflow(evaluate_flow, **base, model=trained["model"])}
    report = write_report(cfg, summaries, time.perf_counter() - t0, compared)
    return {"report": str(report), "eval": summaries["evaluate"]["out"], "model": outs.get("model", cfg.evaluate.model),
            "baselines": {m: c["evaluate"]["out"] for m, c in compared.items()},
            "mode": cfg.train.mode if not cfg.evaluate.model else "model",
            "train": summaries.get("train", {}).get("out"),
            "contact_sheet": summaries.get("ground", {}).get("contact_sheet"),
            "stages": {name: "cached" if st.get("reused") else "ran" for name, st in summaries.items()},
            "seconds": round(time.perf_counter() - t0, 1)}


def write_report(cfg: PipelineConfig, summaries: dict[str, dict[str, Any]], seconds: float,
                 compared: dict[str, dict[str, dict[str, Any]]] | None = None) -> Path:
    """The run's Markdown report (grain.stages.report_path) + a Markdown artifact: config summary, per-stage
    folders/counts/timings, the comparison with the baselines (``cfg.baselines``), every eval table, the loss curve
    and contact sheet paths, and the cost model with this run's images/s per stage (:func:`cost_section`)."""
    from grain.evaluate.run import comparison_table
    eval_dir = Path(summaries["evaluate"]["out"])
    skipped = [s for s in stages.STAGES if s not in summaries]
    lines = ["# grain pipeline report", "",
             f"workdir `{stages.workdir_path(cfg)}`; ingest `{cfg.ingest.source}`; describe `{cfg.describe.engine}`; "
             f"ground `{cfg.ground.engine}`; train `{cfg.train.mode}` / `{cfg.train.arch}` × "
             f"{f'{cfg.train.epochs:g} epochs' if cfg.train.epochs else f'{cfg.train.steps} steps'}"
             f"{'' if cfg.recipe == 'grain' else f' (recipe `{cfg.recipe}`)'}; "
             f"total {seconds:.1f} s", "", "| stage | output | this run | counts |", "|---|---|---|---|"]
    for name, st in summaries.items():
        counts = {k: st[k] for k in ("steps", "bad_steps", "encoded", "cached") if k in st}
        totals = st.get("totals") or {}
        counts.update({k: totals[k] for k in ("rows_in", "rows_out", "rows_described", "rows_no_description",
                                              "rows_with_errors", "normalised", "inputs_cut_short",
                                              # engine work this run vs the annotation store (docs/annotation-store.md)
                                              "requests", "detector_calls", "store_hits", "deduplicated")
                       if k in ("rows_in", "rows_out") and k in totals or totals.get(k)})
        if totals.get("quarantined"):
            counts["quarantined"] = totals["quarantined"]
        took = f"{st.get('wall_seconds', 0):.1f} s"
        this_run = f"cached (took {took} when it ran)" if st.get("reused") else took
        lines.append(f"| {name} | `{st['out']}` | {this_run} | {json.dumps(counts)} |")
    for mode, c in (compared or {}).items():
        for name in ("train", "evaluate"):
            st = c[name]
            took = f"{st.get('wall_seconds', 0):.1f} s"
            lines.append(f"| {name} ({mode}) | `{st['out']}` | {f'cached (took {took} when it ran)' if st.get('reused') else took} | "
                         f"{json.dumps({k: st[k] for k in ('steps', 'encoded', 'cached') if k in st})} |")
    if skipped:
        lines += ["", f"Not run (not needed by this config): {', '.join(skipped)}."]
    evals = {cfg.train.mode if not cfg.evaluate.model else "model": eval_dir}
    evals.update({mode: Path(c["evaluate"]["out"]) for mode, c in (compared or {}).items()})
    if len(evals) > 1:
        lines += ["", comparison_table(evals)]
    for folder in evals.values():
        table = folder / stages.EVAL_TABLE_FILE
        lines += ["", table.read_text() if table.exists() else "(no eval table)", ""]
    if "train" in summaries:
        curve = Path(summaries["train"]["out"]) / "loss_curve.png"
        lines.append(f"Loss curve: `{curve}`" + ("" if curve.exists() else " (missing)"))
    sheet = summaries.get("ground", {}).get("contact_sheet")
    if sheet:
        lines.append(f"Contact sheet (boxes of the ground stage): `{sheet}`")
    lines += ["", *cost_section(cfg, summaries, compared)]
    text = "\n".join(lines) + "\n"
    out = stages.report_path(cfg, eval_dir)
    with entry_lock(out, f"report {out}"):  # two runs of one config write the same report
        write_text_atomic(out, text)
    create_markdown_artifact(markdown=text, key="grain-report", description="grain pipeline report")
    return out


def cost_section(cfg: PipelineConfig, summaries: dict[str, dict[str, Any]],
                 compared: dict[str, dict[str, dict[str, Any]]] | None = None) -> list[str]:
    """The report's "Cost at scale" section (grain.costs, docs/cost-model.md): FLOPs per image of the paper-size
    models (stored counts: no model is built here), GPU-hours for CC3M/CC12M, and this run's measured images/s per
    stage. A failure is reported in the section, never raised: the report is written either way."""
    try:
        from grain import costs

        runs = {**summaries, **{f"train ({mode})": c["train"] for mode, c in (compared or {}).items()}}
        engines = {"ingest": cfg.ingest.source, "describe": cfg.describe.engine, "ground": cfg.ground.engine,
                   "train": f"{cfg.train.arch} {cfg.train.mode}, batch {cfg.train.batch_size}"}
        engines.update({f"train ({mode})": f"{cfg.train.arch} {mode}, batch {cfg.train.batch_size}" for mode in compared or {}})
        measured = costs.measured_throughput(runs, batch_size=cfg.train.batch_size, engines=engines)
        machine = f"{platform.machine()}, {os.cpu_count()} cores; train device `{cfg.train.device}`"
        return costs.markdown_lines(costs.cost_model(), measured, heading="##", machine=machine)
    except Exception as exc:  # noqa: BLE001 - the report must not fail on its cost section
        return ["## Cost at scale", "", f"Not available: {type(exc).__name__}: {exc}"]


ALL_FLOWS = {"full-pipeline": full_pipeline, **FLOWS}
