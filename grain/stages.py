"""The stage registry: every stage of the pipeline described once.

For each stage it says which inputs it reads (and which of them a given config actually needs), what its
fingerprint is made of, where it writes, when its output is finished, and how to run it. The CLI, ``grain run``,
the Prefect flows (flows/) and the benches all go through this module; nothing else names a stage folder or decides
which inputs a training mode reads.

```
inputs:    samples ──► descriptions ──► regions ──► model ──► (eval results)
stage:     ingest      describe         ground      train     evaluate
folder:    samples/    descriptions/    regions/    train/    eval/        (each <workdir>/<folder>/<fingerprint>)
```

A stage's **fingerprint** hashes the part of its config section that decides its output (fields marked
``NOT_FINGERPRINTED`` in grain.config are left out), the stage's code version, and the fingerprints of the inputs
it reads: a stage folder's own fingerprint (its ``_stage.json``), the input files' signature for ingest, the model's
content hash (stored in its ``grain_model.json`` at save time) for evaluate. Because the fingerprints of planned
folders follow from the config alone, :func:`plan` names every folder of a pipeline before any of it runs (only
evaluate waits for its model to exist). Nothing here imports torch, open_clip, transformers, Ray or Prefect: the
stage code is imported when a stage runs, not when a folder is named.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from grain.config import PipelineConfig, canonical_json, fingerprint, fingerprint_view

#: Which stage produces each named input.
PRODUCER: dict[str, str] = {"samples": "ingest", "descriptions": "describe", "regions": "ground", "model": "train"}

STAGE_FILE = "_stage.json"  # written first by every Parquet stage (grain.shards) and by train
MODEL_CONFIG_FILE = "grain_model.json"
MODEL_WEIGHTS_FILE = "model.safetensors"
TRAIN_SUMMARY_FILE = "summary.json"
EVAL_RESULTS_FILE = "results.parquet"
EVAL_TABLE_FILE = "results.md"
EVAL_SUMMARY_FILE = "summary.json"


# ------------------------------------------------------------------------------------------------ layout


def workdir_path(cfg: PipelineConfig | str | Path) -> Path:
    """The absolute workdir (a relative ``workdir`` is taken relative to the current directory, once)."""
    workdir = cfg.workdir if isinstance(cfg, PipelineConfig) else cfg
    return Path(workdir).expanduser().absolute()


def stage_folder(workdir: str | Path, stage: str, fp: str) -> Path:
    """``<workdir>/<folder of stage>/<fingerprint>``, e.g. ``runs/default/samples/3f2a…``."""
    return workdir_path(workdir) / STAGES[stage].folder / fp


def inspect_sheet_path(cfg: PipelineConfig, regions_dir: str | Path | None, samples_dir: str | Path | None = None) -> Path:
    """``<workdir>/inspect/<regions fp>.png`` (or ``ground-truth-<samples fp>.png`` when drawing the samples' own
    regions): where contact sheets go."""
    name = Path(regions_dir).name if regions_dir is not None else f"ground-truth-{Path(samples_dir or '').name}"
    return workdir_path(cfg) / "inspect" / f"{name}.png"


def report_path(cfg: PipelineConfig, eval_dir: str | Path) -> Path:
    """``<workdir>/reports/<eval fp>.md``: the pipeline report of one evaluation."""
    return workdir_path(cfg) / "reports" / f"{Path(eval_dir).name}.md"


def eval_cache_dir(workdir: str | Path) -> Path:
    """``<workdir>/eval/cache``: image embeddings per (model content hash, dataset fingerprint)."""
    return workdir_path(workdir) / "eval" / "cache"


def synthetic_eval_samples(workdir: str | Path, ingest_cfg: Any) -> Path:
    """Where evaluate ingests a synthetic eval split: the samples/ folder of that ingest config."""
    return stage_folder(workdir, "ingest", INGEST.fingerprint_of(ingest_cfg))


# ------------------------------------------------------------------------------------------------ input identities


def read_header(folder: str | Path) -> dict[str, Any]:
    """The ``_stage.json`` of a stage folder; FileNotFoundError naming the folder when it has none."""
    path = Path(folder) / STAGE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        what = "does not exist" if not Path(folder).exists() else f"is not a stage output folder (no {STAGE_FILE})"
        raise FileNotFoundError(f"{folder} {what}; run the stage that writes it first") from None


def model_content_hash(meta: Mapping[str, Any], weights: str | Path) -> str:
    """The content hash of a model: its format, mode and arch (canonical JSON) and the bytes of its weights.

    Computed once when a model is saved and stored in its ``grain_model.json`` (``content_hash``), so naming an
    evaluation folder never rereads the weights.
    """
    h = hashlib.sha256(canonical_json({k: meta[k] for k in ("format", "mode", "arch")}).encode())
    with open(weights, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def model_key(model_dir: str | Path) -> str:
    """A model folder's content hash: read from its ``grain_model.json``; computed from the files for folders
    saved before the hash was stored."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / MODEL_CONFIG_FILE
    try:
        meta = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{model_dir} is not a model folder (no {MODEL_CONFIG_FILE}); run `grain train` "
                                "first or pass --model") from None
    return meta.get("content_hash") or model_content_hash(meta, model_dir / MODEL_WEIGHTS_FILE)


def input_fingerprint(name: str, folder: str | Path) -> str:
    """The identity of an existing input folder: a model's content hash, or a stage folder's fingerprint."""
    if name == "model":
        return model_key(folder)
    return read_header(folder)["fingerprint"]


# ------------------------------------------------------------------------------------------------ stages


@dataclass(frozen=True)
class Stage:
    """One stage: ``inputs`` it may read (by input name), the ``folder`` it writes under the workdir, its code
    version (bump it when the same input and config would give different output), and how to run it."""

    name: str
    folder: str
    inputs: tuple[str, ...]
    code_version: str
    summary: str
    section_name: str = ""
    flow_retries: int = 0  # Prefect task retries: only where a retry can help (engines over a network)

    # -- config
    def section(self, cfg: PipelineConfig) -> BaseModel:
        return getattr(cfg, self.section_name or self.name)

    def view(self, section: Any) -> dict[str, Any]:
        """What of the config section decides the output (the fingerprint's view)."""
        return fingerprint_view(section)

    def needs(self, cfg: PipelineConfig) -> tuple[str, ...]:
        """The inputs this config actually reads (a subset of ``inputs``)."""
        return self.inputs

    # -- identity
    def upstream(self, section: Any, fps: Mapping[str, str]) -> dict[str, Any]:
        """The fingerprint's upstream part from the inputs' fingerprints."""
        return dict(sorted(fps.items()))

    def fingerprint(self, section: Any, upstream: Mapping[str, Any]) -> str:
        return fingerprint(self.name, self.view(section), self.code_version, dict(upstream))

    def fingerprint_of(self, section: Any, inputs: Mapping[str, str | Path | None] | None = None) -> str:
        """The fingerprint for existing input folders (what the stage writes into its header)."""
        fps = {k: input_fingerprint(k, v) for k, v in (inputs or {}).items() if v is not None}
        return self.fingerprint(section, self.upstream(section, fps))

    # -- output
    def is_finished(self, folder: str | Path) -> bool:
        """True when ``folder`` holds the complete output (what a cache may rely on)."""
        from grain.shards import is_complete

        return is_complete(folder)

    def run(self, cfg: PipelineConfig, inputs: Mapping[str, Path], out: Path, **opts: Any) -> dict[str, Any]:
        raise NotImplementedError


class _Ingest(Stage):
    def upstream(self, section: Any, fps: Mapping[str, str]) -> dict[str, Any]:
        from grain.data.readers import input_signature

        return {"inputs": input_signature(section)}

    def run(self, cfg: PipelineConfig, inputs: Mapping[str, Path], out: Path, *, rank: int = 0, world_size: int = 1,
            workers: int = 1, progress: bool = False) -> dict[str, Any]:
        from grain.data.ingest import ingest

        return _shard_summary(ingest(cfg.ingest, out, rank=rank, world_size=world_size, workers=workers,
                                     progress=progress))


class _Describe(Stage):
    def view(self, section: Any) -> dict[str, Any]:
        return section.engine_settings()

    def is_finished(self, folder: str | Path) -> bool:
        """Complete, and at least one row described: a folder in which no row got a usable description would feed
        training nothing, so it never counts as finished (the flow stops at describe with :func:`no_success`)."""
        return super().is_finished(folder) and no_success(self.name, folder) is None

    def run(self, cfg: PipelineConfig, inputs: Mapping[str, Path], out: Path, *, rank: int = 0, world_size: int = 1,
            progress: bool = False) -> dict[str, Any]:
        from grain.annotate.describe import describe
        from grain.shards import iter_markers

        from grain.annotate.store import resolve_root

        result = describe(cfg.describe, inputs["samples"], out, ray_cfg=cfg.ray, rank=rank, world_size=world_size,
                          progress=progress, store_root=resolve_root(cfg.annotation_cache))
        summary = _shard_summary(result)
        if result.complete:
            summary["rows_with_errors"] = sum(m.get("errors", 0) for m in iter_markers(out))
            problem = no_success(self.name, out)
            if problem:
                raise NothingSucceeded(problem)
        return summary


class _Ground(Stage):
    def view(self, section: Any) -> dict[str, Any]:
        return section.engine_settings()

    def is_finished(self, folder: str | Path) -> bool:
        return super().is_finished(folder) and no_success(self.name, folder) is None

    def run(self, cfg: PipelineConfig, inputs: Mapping[str, Path], out: Path, *, rank: int = 0, world_size: int = 1,
            progress: bool = False, contact_sheet: bool = True) -> dict[str, Any]:
        from grain.annotate.ground import ground
        from grain.shards import iter_markers

        from grain.annotate.store import resolve_root

        result = ground(cfg.ground, inputs["samples"], inputs["descriptions"], out, ray_cfg=cfg.ray, rank=rank,
                        world_size=world_size, progress=progress, store_root=resolve_root(cfg.annotation_cache))
        summary = _shard_summary(result)
        if result.complete:
            markers = list(iter_markers(out))
            summary.update(boxes=sum(m["boxes"] for m in markers),
                           descriptions=sum(m["descriptions"] for m in markers),
                           descriptions_grounded=sum(m["descriptions_grounded"] for m in markers))
            problem = no_success(self.name, out)
            if problem:
                raise NothingSucceeded(problem)
            if contact_sheet:
                summary["contact_sheet"] = str(render_contact_sheet(cfg, inputs["samples"], out))
        return summary


class _Train(Stage):
    def view(self, section: Any) -> dict[str, Any]:
        """The train config's semantics plus the architecture it resolves to: a bundled arch is named in the config
        but defined by its JSON file, so a change to that file (another decoder) must give new run folders."""
        view = section.semantics()
        try:
            from grain.train.arch import load_arch

            view["resolved_arch"] = load_arch(section.arch, section.arch_overrides)
        except (ValueError, OSError):  # an unknown arch fails where the model is built, with its own message
            pass
        if section.init_from:  # the starting weights by content: a moved file is the same run, a new one is not
            try:
                from grain.train.openclip_io import towers_fingerprint

                view["init_from"] = towers_fingerprint(section.init_from)
            except (ValueError, OSError):  # a missing source fails in preflight / run, with its own message
                view["init_from"] = f"unreadable:{section.init_from}"
        return view

    def needs(self, cfg: PipelineConfig) -> tuple[str, ...]:
        mode = cfg.train.mode_spec
        return ("samples",) + (("descriptions",) if mode.reads_descriptions(cfg.train.rewrite_prob) else ()) + (
            ("regions",) if mode.reads_regions else ())

    def is_finished(self, folder: str | Path) -> bool:
        folder = Path(folder)
        return (folder / TRAIN_SUMMARY_FILE).exists() and (folder / "model" / MODEL_CONFIG_FILE).exists()

    def run(self, cfg: PipelineConfig, inputs: Mapping[str, Path], out: Path, *, resume: str | None = "latest",
            launcher: str = "local", progress: bool = False) -> dict[str, Any]:
        """Train into ``out`` under its folder lock (grain.locks). A second process on the same folder waits; a
        finished folder (this process waited for its writer, or it was finished before) is not trained again: its
        summary is returned (``resume=None`` retrains). Under torchrun, whose other ranks could not wait that long,
        rank 0 stops at once with an error naming the holder."""
        import os

        from grain.locks import exclusive

        if cfg.train.init_from:  # a checkpoint that cannot fit fails here, before a folder or lock is made
            from grain.train.openclip_io import check_init_from

            check_init_from(cfg.train)
        torchrun = launcher == "local" and int(os.environ.get("WORLD_SIZE", "1")) > 1
        if torchrun and int(os.environ.get("RANK", "0")) != 0:  # rank 0 holds the lock for its whole job
            if resume == "latest" and self.is_finished(out):  # as rank 0 decides: nothing to train
                return {"stage": self.name, "out": str(out), "model": str(out / "model")}
            return self._train(cfg, inputs, out, resume=resume, launcher=launcher, progress=progress)
        with exclusive(out, f"train folder {out}", wait=not torchrun) as waited:
            if resume == "latest" and self.is_finished(out):
                return self.finished_summary(out, waited)
            return self._train(cfg, inputs, out, resume=resume, launcher=launcher, progress=progress)

    def finished_summary(self, out: Path, waited: bool = False) -> dict[str, Any]:
        """The summary of a finished run folder (what ``run`` returned when it trained it); ``waited``: another
        process finished it while this one waited for the lock."""
        done = json.loads((out / TRAIN_SUMMARY_FILE).read_text())
        curve = out / "loss_curve.png"
        return {"stage": self.name, "out": str(out), "model": str(out / "model"), "steps": done["steps"],
                "seconds": done["seconds"], "bad_steps": done.get("bad_steps", 0),
                "loss_curve": str(curve) if curve.exists() else None, "written_by_another_process": waited,
                "already_finished": not waited}

    def _train(self, cfg: PipelineConfig, inputs: Mapping[str, Path], out: Path, *, resume: str | None,
               launcher: str, progress: bool) -> dict[str, Any]:
        samples, descriptions, regions = (inputs.get(k) for k in ("samples", "descriptions", "regions"))
        summary: dict[str, Any] = {"stage": self.name, "out": str(out), "model": str(out / "model")}
        if launcher == "ray":
            from grain.train.launch import train_with_ray

            done = train_with_ray(cfg.train, cfg.ray, samples, descriptions, regions, out, resume)
            summary.update(steps=done["steps"], seconds=done["seconds"], bad_steps=done.get("bad_steps", 0))
        elif launcher == "local":
            from grain.train import dist
            from grain.train.loop import train

            def make_probe() -> Any:  # called by train() on rank 0 only, once the process group says which is 0
                from grain.evaluate.probe import ZeroShotProbe

                return ZeroShotProbe(cfg, workdir_path(cfg), cfg.train.eval_images)

            result = train(cfg.train, samples, descriptions, regions, out, resume=resume, progress=progress,
                           make_probe=make_probe)
            if dist.get_rank() != 0:  # torchrun: only rank 0 exports and reports
                return summary
            summary.update(steps=result.steps, seconds=result.seconds, bad_steps=result.bad_steps)
        else:
            raise ValueError(f"launcher must be 'local' or 'ray', got {launcher!r}")
        from grain.train.plot import loss_curve_png

        curve = loss_curve_png(out / "metrics.jsonl", out / "loss_curve.png")
        summary["loss_curve"] = str(curve) if curve else None
        return summary


class _Evaluate(Stage):
    def is_finished(self, folder: str | Path) -> bool:
        folder = Path(folder)
        return (folder / EVAL_RESULTS_FILE).exists() and (folder / EVAL_SUMMARY_FILE).exists()

    def run(self, cfg: PipelineConfig, inputs: Mapping[str, Path], out: Path, *, progress: bool = False) -> dict[str, Any]:
        """Evaluate into ``out`` under its folder lock (grain.locks); a second process on the same folder waits and
        then returns the first one's results instead of evaluating again."""
        from grain.evaluate.run import evaluate, read_results
        from grain.locks import exclusive

        with exclusive(out, f"evaluate folder {out}") as waited:
            if waited and self.is_finished(out):
                done = json.loads((out / EVAL_SUMMARY_FILE).read_text())
                return {"stage": self.name, "out": str(out), "table": str(out / EVAL_TABLE_FILE),
                        "rows": read_results(out), "skipped": done["skipped"], "seconds": done["seconds"],
                        "encoded": done["encoded"], "cached": done["cache_hits"], "written_by_another_process": True}
            result = evaluate(cfg.evaluate, inputs["model"], out, workdir=workdir_path(cfg),
                              synthetic=cfg.ingest.synthetic, progress=progress)
        return {"stage": self.name, "out": str(out), "table": str(out / EVAL_TABLE_FILE), "rows": result.rows,
                "skipped": result.skipped, "seconds": result.seconds, "encoded": result.encoded,
                "cached": result.cached}


INGEST = _Ingest("ingest", "samples", (), "ingest/2",
                 "image-caption data → validated samples/ shards (+ quarantine)")
DESCRIBE = _Describe("describe", "descriptions", ("samples",), "describe/1",
                     "an MLLM writes region descriptions and a caption rewrite per image", flow_retries=2)
GROUND = _Ground("ground", "regions", ("samples", "descriptions"), "ground/1",
                 "a detector (OWLv2) boxes every description", flow_retries=1)
TRAIN = _Train("train", "train", ("samples", "descriptions", "regions"), "train/1",
               "the GRAIN model or a baseline (train.mode) → <run>/model")
EVALUATE = _Evaluate("evaluate", "eval", ("model",), "evaluate/1",
                     "zero-shot classification and retrieval → results.parquet", section_name="evaluate")

#: Every stage, in pipeline order.
STAGES: dict[str, Stage] = {s.name: s for s in (INGEST, DESCRIBE, GROUND, TRAIN, EVALUATE)}


def get(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None


# ------------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class Step:
    """One stage resolved for a config: the input folders it reads, its fingerprint and its output folder."""

    stage: Stage
    inputs: dict[str, Path]
    fingerprint: str
    out: Path
    upstream: dict[str, Step] = field(default_factory=dict, compare=False)

    @property
    def finished(self) -> bool:
        return self.stage.is_finished(self.out)


def plan(cfg: PipelineConfig, stage: str, given: Mapping[str, str | Path | None] | None = None) -> Step:
    """Resolve ``stage`` for ``cfg``: its inputs (the ``given`` folders, else the folders this config's upstream
    stages write — recursively, with only the inputs the config needs) and its output folder.

    Fingerprints of planned folders follow from the config, so nothing upstream has to exist yet — except the model
    of evaluate (its content hash names the folder): FileNotFoundError names it when it does not exist. Given
    folders must be finished outputs of their stage (their header gives their fingerprint).
    """
    given = {k: Path(v) for k, v in (given or {}).items() if v is not None}
    return _plan(cfg, get(stage), given, {})


def _plan(cfg: PipelineConfig, stage: Stage, given: dict[str, Path], memo: dict[str, Step]) -> Step:
    if stage.name in memo:
        return memo[stage.name]
    section = stage.section(cfg)
    inputs: dict[str, Path] = {}
    fps: dict[str, str] = {}
    upstream_steps: dict[str, Step] = {}
    for name in stage.needs(cfg):
        if name in given:
            inputs[name] = given[name]
            fps[name] = input_fingerprint(name, given[name])
        elif name == "model" and cfg.evaluate.model:
            inputs[name] = Path(cfg.evaluate.model).expanduser().absolute()
            fps[name] = input_fingerprint(name, inputs[name])
        else:
            up = _plan(cfg, get(PRODUCER[name]), given, memo)
            upstream_steps[name] = up
            inputs[name] = up.out / "model" if name == "model" else up.out
            fps[name] = input_fingerprint(name, inputs[name]) if name == "model" else up.fingerprint
    fp = stage.fingerprint(section, stage.upstream(section, fps))
    step = Step(stage, inputs, fp, stage_folder(cfg.workdir, stage.name, fp), upstream_steps)
    memo[stage.name] = step
    return step


def pipeline_stages(cfg: PipelineConfig, target: str = "evaluate") -> list[str]:
    """The stages ``target`` depends on for this config (itself included), in pipeline order: e.g. a ``clip`` run
    without caption rewrites needs neither describe nor ground; an evaluation of a given model needs no training."""
    wanted: set[str] = set()

    def visit(name: str) -> None:
        wanted.add(name)
        for inp in get(name).needs(cfg):
            if not (inp == "model" and cfg.evaluate.model):
                visit(PRODUCER[inp])

    visit(target)
    return [s for s in STAGES if s in wanted]


# ------------------------------------------------------------------------------------------------ helpers


class NothingSucceeded(ValueError):
    """A describe or ground stage finished with no usable row: training on it would learn nothing from it."""


def no_success(stage: str, folder: str | Path) -> str | None:
    """Why a finished describe / ground folder is unusable (no row described; every row grounded with an error),
    or None. Read from the shard markers."""
    from grain.shards import iter_markers

    if stage == "describe":  # summarize reads the markers once and counts the rows by state
        from grain.annotate.describe import summarize

        t = summarize(folder)
        rows = t["rows_out"]
        if not rows or t["rows_described"]:
            return None
        example = t.get("error_example") or {}
        why = (f"{t['rows_with_errors']} with an error (e.g. uid {example.get('uid')}: {example.get('error')})"
               if t["rows_with_errors"] else "")
        why += (", " if why and t["rows_no_description"] else "") + (
            f"{t['rows_no_description']} with no usable description" if t["rows_no_description"] else "")
        return (f"describe: none of the {rows} rows of {folder} got a usable description ({why}); training on it would "
                "learn nothing from descriptions. Check describe.engine (reference only copies ground-truth regions, "
                "which the synthetic world carries; for your own images use openai with a vLLM server, or vllm on "
                "GPUs: docs/describe.md) and rerun")
    markers = list(iter_markers(folder))
    rows = sum(m["rows_out"] for m in markers)
    if not rows or sum(m.get("errors", 0) for m in markers) < rows:
        return None
    return (f"ground: every one of the {rows} rows of {folder} failed; training on it would learn nothing from boxes. "
            "Check ground.engine (reference only copies ground-truth boxes, which the synthetic world carries; for "
            "your own images use owlv2: docs/ground.md) and rerun")


def preflight(cfg: PipelineConfig, target: str = "evaluate") -> None:
    """Settings that cannot serve the input, found before anything runs (ValueError naming the keys and the docs):
    the reference engines on input that carries no ground truth (CSV + image folder), a ``train.init_from``
    checkpoint that does not fit ``train.arch``, and the synthetic world's eval splits for a model trained on other
    data."""
    needed = pipeline_stages(cfg, target)
    own = cfg.ingest.source == "csv"  # CSV rows are (image path, caption): no ground-truth regions
    for stage, engine, what, fix in (("describe", cfg.describe.engine, "region texts", "describe.engine=openai (a vLLM "
                                      "server, describe.openai.base_url) or vllm (GPUs): docs/describe.md"),
                                     ("ground", cfg.ground.engine, "boxes", "ground.engine=owlv2: docs/ground.md")):
        if own and stage in needed and engine == "reference":
            raise ValueError(f"{stage}.engine=reference copies ground-truth {what}, and ingest.source=csv carries none "
                             f"(only the synthetic world, or webdataset/parquet inputs with a 'regions' field, do): "
                             f"every row would fail. Set {fix}")
    if "train" in needed and cfg.train.init_from:
        from grain.train.openclip_io import check_init_from

        check_init_from(cfg.train)
    if "evaluate" in needed and cfg.ingest.source != "synthetic" and not cfg.evaluate.model and all(
            ds.kind == "synthetic" for ds in cfg.evaluate.datasets):
        raise ValueError(f"evaluate.datasets are the synthetic world's splits (the default), which have nothing to do "
                         f"with ingest.source={cfg.ingest.source}: name eval sets for your data in evaluate.datasets "
                         "(kind image_folder, clip_benchmark, list, karpathy or samples: docs/evaluate.md)")


def _shard_summary(result: Any) -> dict[str, Any]:
    from grain.shards import result_summary

    summary = result_summary(result)
    return {"out": summary.pop("out_dir"), **summary}


def render_contact_sheet(cfg: PipelineConfig, samples: str | Path, regions: str | Path) -> Path:
    """The ground stage's visual QA: 16 images with their boxes, at :func:`inspect_sheet_path` (made once)."""
    from grain.annotate.inspect_sheet import render_contact_sheet as render

    from grain.locks import entry_lock

    target = inspect_sheet_path(cfg, regions)
    if not target.exists():
        with entry_lock(target, f"contact sheet {target}"):  # two runs finishing the same ground stage draw it once
            if not target.exists():
                render(samples, regions, target)
    return target
