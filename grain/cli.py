"""The ``grain`` command line. Each stage subcommand loads one config, plans the stage through the registry
(grain.stages: which folders it reads and where it writes), runs it, and prints where the output went; nothing here
holds logic a notebook or a Prefect task could not call directly."""

from __future__ import annotations

import errno
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
import yaml

from grain.config import ConfigError, PipelineConfig, load_config

app = typer.Typer(
    name="grain",
    help="GRAIN pretraining pipeline: ingest → describe → ground → train → evaluate, as restartable stages over "
    "folders of Parquet shards. Every command takes --config (YAML; default: the built-in synthetic world) and "
    "any number of --set section.key=value overrides.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="YAML config file; omitted = built-in defaults (configs/default.yaml).", exists=False),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Dotted override, repeatable: --set ingest.num_shards=8 --set workdir=runs/x"),
]


def _load(config: Path | None, overrides: list[str] | None) -> PipelineConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        _fail(exc)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _fail(exc: BaseException) -> NoReturn:
    """One line naming what is wrong (a file, key or folder) and exit 2; no traceback for user errors."""
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2) from None


USER_ERRORS = (FileNotFoundError, ValueError, LookupError)


def _run_stage(cfg: PipelineConfig, stage: str, given: dict[str, Path | None], out: Path | None,
               **opts: object) -> dict:
    """Plan ``stage`` through the registry (grain.stages), run it into ``out`` or its planned folder."""
    from grain import stages
    from grain.locks import LockBusyError

    target = None
    try:
        if not any(given.values()):  # folders the user passed decide the inputs, not the config's source
            stages.preflight(cfg, stage)
        step = stages.plan(cfg, stage, given)
        target = (out or step.out).absolute()
        return step.stage.run(cfg, step.inputs, target, **opts)
    except (*USER_ERRORS, LockBusyError) as exc:
        _fail(exc)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        file = f" at {exc.filename}" if exc.filename else ""
        _fail(RuntimeError(f"disk full while {stage} was writing to {target or cfg.workdir} ({exc.strerror or exc}{file}); "
                           f"{DISK_FULL_AFTERMATH.get(stage, DISK_FULL_AFTERMATH['shards'])}"))


ANOTHER_PROCESS = ("written by another process that held this folder's lock while this one waited; nothing was "
                   "redone here (the counts above are that run's)")

#: What a full disk left behind, and what a rerun does, per stage (the disk-full error's second half).
DISK_FULL_AFTERMATH = {
    "shards": "the shard being written was dropped, finished shards are intact. Free space (or set workdir "
              "elsewhere) and rerun: only unfinished shards run",
    "train": "the checkpoint or model being written was dropped, earlier checkpoints are intact. Free space (or set "
             "workdir elsewhere) and rerun: training resumes from the newest checkpoint",
    "evaluate": "the cache entry or results being written were dropped, cache entries written before are intact. "
                "Free space (or set workdir elsewhere) and rerun: only what is missing is computed",
}


@app.command()
def ingest(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder; default <workdir>/samples/<fingerprint>.")] = None,
    rank: Annotated[int, typer.Option(help="This process's rank when several processes/machines split the shards.")] = 0,
    world_size: Annotated[int, typer.Option(help="Number of processes/machines splitting the shards.")] = 1,
    workers: Annotated[int, typer.Option(help="Local worker processes (shards run in parallel).")] = 1,
    progress: Annotated[bool, typer.Option(help="Show a progress bar over shards.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each committed shard.")] = False,
) -> None:
    """Ingest image-caption data into samples/ Parquet shards.

    Sources (ingest.source): synthetic (built-in world), webdataset (img2dataset tars), parquet (img2dataset or HF-style), csv (.csv/.tsv/.jsonl of image path + caption, with ingest.image_root).

    Bad rows go to quarantine/ with a reason; finished shards are skipped on rerun, so a killed run resumes and a warm rerun does no work.
    """
    _setup_logging(verbose)
    cfg = _load(config, set_)
    _report(_run_stage(cfg, "ingest", {}, out, rank=rank, world_size=world_size, workers=workers, progress=progress))


@app.command()
def describe(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    samples: Annotated[Optional[Path], typer.Option(help="samples/ folder; default: the one ingest writes for this config.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder; default <workdir>/descriptions/<fingerprint>.")] = None,
    rank: Annotated[int, typer.Option(help="This process's rank when several processes/machines split the shards.")] = 0,
    world_size: Annotated[int, typer.Option(help="Number of processes/machines splitting the shards.")] = 1,
    progress: Annotated[bool, typer.Option(help="Show a progress bar (images/s, errors, shards done).")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each committed shard.")] = False,
) -> None:
    """Write region descriptions (and rewritten captions) for every image into descriptions/.

    Engines (describe.engine): reference (ground-truth region texts, synthetic world), openai (an OpenAI-compatible server such as `vllm serve`, set describe.openai.base_url), transformers (in-process), vllm (offline vLLM in Ray Data on GPUs). Ray settings: ray.address, ray.actors, ray.actor_num_cpus.

    Failed requests keep an error in their row and are retried on the next run; finished shards are skipped.
    """
    _setup_logging(verbose)
    cfg = _load(config, set_)
    summary = _run_stage(cfg, "describe", {"samples": samples}, out, rank=rank, world_size=world_size, progress=progress)
    _report(summary)
    if "rows_described" in summary["totals"]:
        from grain.annotate.describe import format_counts

        typer.echo(f"  {format_counts(summary['totals'])}")
    if summary.get("rows_with_errors"):
        typer.echo(f"  {summary['rows_with_errors']} row(s) have an error (kept, with the reason in 'error'); rerun to retry them")


@app.command()
def ground(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    samples: Annotated[Optional[Path], typer.Option(help="samples/ folder; default: the one ingest writes for this config.")] = None,
    descriptions: Annotated[Optional[Path], typer.Option(help="descriptions/ folder; default: the one describe writes for this config.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder; default <workdir>/regions/<fingerprint>.")] = None,
    rank: Annotated[int, typer.Option(help="This process's rank when several processes/machines split the shards.")] = 0,
    world_size: Annotated[int, typer.Option(help="Number of processes/machines splitting the shards.")] = 1,
    progress: Annotated[bool, typer.Option(help="Show a progress bar (images/s, shards done).")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each committed shard.")] = False,
) -> None:
    """Find a box for every description of every image (regions/).

    Engines (ground.engine): reference (ground-truth boxes of the synthetic world, score 1) or owlv2 (OWLv2 with each image's descriptions as text queries; ground.model, ground.threshold, ground.top_k_per_description, ground.top_k_per_image, ground.nms_iou, ground.device).

    Boxes are stored as x0, y0, x1, y1 normalised to the original image. Per-shard QA stats land in the markers; see them with `grain stats`; a contact sheet of boxes goes to <workdir>/inspect/ (more with `grain inspect`).
    """
    _setup_logging(verbose)
    cfg = _load(config, set_)
    summary = _run_stage(cfg, "ground", {"samples": samples, "descriptions": descriptions}, out, rank=rank,
                         world_size=world_size, progress=progress)
    _report(summary)
    if "boxes" in summary:
        described, grounded = summary["descriptions"], summary["descriptions_grounded"]
        typer.echo(f"  {summary['boxes']} boxes; {grounded}/{described} descriptions grounded"
                   + (f" ({grounded / described:.0%})" if described else ""))
    if summary.get("contact_sheet"):
        typer.echo(f"  contact sheet: {summary['contact_sheet']}")


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    samples: Annotated[Optional[Path], typer.Option(help="samples/ folder; default: the one ingest writes for this config.")] = None,
    descriptions: Annotated[Optional[Path], typer.Option(help="descriptions/ folder; default: the one describe writes.")] = None,
    regions: Annotated[Optional[Path], typer.Option(help="regions/ folder; default: the one ground writes.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder; default <workdir>/train/<fingerprint>.")] = None,
    resume: Annotated[str, typer.Option(help="latest (continue from the newest checkpoint in the run folder, if any), none (start over), or a checkpoint folder.")] = "latest",
    launcher: Annotated[str, typer.Option(help="local: this process (also what each torchrun process runs); ray: Ray Train workers (train.ray_workers, ray.address).")] = "local",
    progress: Annotated[bool, typer.Option(help="Show a progress bar (loss, samples/s, ETA).")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log resumes, skipped steps and checkpoints.")] = False,
) -> None:
    """Train the GRAIN model (train.mode=grain) or a baseline (clip, clip_desc, no_rd, no_box).

    Reads the folders the mode needs (grain.config.TRAIN_MODES: clip reads samples/ only, plus descriptions/ when
    train.rewrite_prob > 0; the other modes read samples/ + descriptions/ + regions/), writes
    <run>/checkpoints/step_NNNNNN/ (keep-last-k), <run>/model/ (the exported model for `grain evaluate`), TensorBoard
    logs in <run>/tb/, metrics.jsonl and loss_curve.png. A killed run continues exactly where its last checkpoint
    left off (--resume latest).

    Multi-GPU on one or many machines: `torchrun --nproc_per_node 8 -m grain.train --set ...` (DDP), or
    `grain train --launcher ray` on a Ray cluster (ray.address). See docs/train.md.
    """
    _setup_logging(verbose)
    from grain.train.loop import TrainingDiverged

    cfg = _load(config, set_)
    if launcher not in ("local", "ray"):
        _fail(ValueError(f"--launcher must be local or ray, got {launcher!r}"))
    resume_arg = None if resume.lower() == "none" else resume
    try:
        summary = _run_stage(cfg, "train", {"samples": samples, "descriptions": descriptions, "regions": regions}, out,
                             resume=resume_arg, launcher=launcher, progress=progress)
    except TrainingDiverged as exc:
        _fail(exc)
    if "steps" in summary:  # rank 0 (other torchrun ranks print nothing)
        typer.echo(f"train {cfg.train.mode}: {summary['steps']} steps in {summary['seconds']:.1f} s -> {summary['out']}")
        typer.echo(f"  model: {summary['model']}")
        if summary.get("written_by_another_process"):
            typer.echo(f"  {ANOTHER_PROCESS}")
        elif summary.get("already_finished"):
            typer.echo("  already finished: nothing was redone (--resume none trains it again)")


@app.command()
def evaluate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[Optional[Path], typer.Option(help="Exported model folder (<run>/model or a checkpoint); default: evaluate.model, else the train stage's model for this config.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Results folder; default <workdir>/eval/<fingerprint>.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars while encoding images.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Zero-shot classification (names, descriptions, waffle, regions with an α sweep) and retrieval.

    Datasets come from evaluate.datasets (default: the synthetic world's unseen classes, single and distractor
    splits). Writes results.parquet (dataset, task, mode, metric, value, n) and results.md; image embeddings are
    cached per (model, dataset) under <workdir>/eval/cache, so rerunning with other modes re-encodes nothing.
    """
    _setup_logging(verbose)
    cfg = _load(config, set_)
    summary = _run_stage(cfg, "evaluate", {"model": model}, out, progress=progress)
    typer.echo(Path(summary["table"]).read_text())
    typer.echo(f"evaluate: {len(summary['rows'])} rows in {summary['seconds']:.1f} s ({summary['encoded']} dataset(s) "
               f"encoded, {summary['cached']} from cache) -> {summary['out']}")
    if summary.get("written_by_another_process"):
        typer.echo(f"  {ANOTHER_PROCESS}")


@app.command()
def plan(
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Show the pipeline this config runs: each stage's output folder, whether it is finished, and what it reads.

    Nothing runs and nothing heavy is imported: folder names follow from the config (see grain.stages)."""
    from grain import stages

    cfg = _load(config, set_)
    for name in stages.pipeline_stages(cfg):
        try:
            step = stages.plan(cfg, name)
        except FileNotFoundError as exc:
            typer.echo(f"{name:9s} (not yet known: {exc})")
            continue
        state = "finished" if step.finished else ("started" if step.out.exists() else "to run")
        reads = ", ".join(f"{k}={v}" for k, v in step.inputs.items()) or "(input files)"
        typer.echo(f"{name:9s} {state:8s} {step.out}\n          reads {reads}")
    skipped = [s for s in stages.STAGES if s not in stages.pipeline_stages(cfg)]
    if skipped:
        typer.echo(f"not needed by this config: {', '.join(skipped)} (train.mode={cfg.train.mode})")


bench_app = typer.Typer(help="Benchmarks that drive the pipeline's stages (their reports are in docs/).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("science")
def bench_science(
    bench: Annotated[Path, typer.Option("--bench", "-b", help="Benchmark file: the shared pipeline config, models, seeds.")] = Path("configs/bench/science.yaml"),
    quick: Annotated[bool, typer.Option(help="The file's quick form (tiny data and steps): checks that every model "
                                        "trains, every mode evaluates and the report is written (CI).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Report to write; default docs/results.md, or "
                                                "<workdir>/science.md with --quick. Plots and results.json go to a "
                                                "folder named after it.")] = None,
    jobs: Annotated[Optional[int], typer.Option(help="Runs trained at a time (processes; torch threads = cores / jobs); default: the file's.")] = None,
    models: Annotated[Optional[str], typer.Option(help="Only these models (comma-separated names of the file's models; "
                                                  "must include the two headline models).")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Only these seeds (comma-separated), e.g. for a one-seed diagnosis.")] = None,
    worlds: Annotated[Optional[str], typer.Option(help="Synthetic worlds to run on: a list named in the file's `worlds` "
                                                  "(test, dev) or comma-separated world seeds. Default: test. Tune "
                                                  "on dev; report test.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Torch threads per job; default: cores / jobs. Results depend "
                                                   "on it (float sums in another order), not on --jobs.")] = None,
    set_: SetOpt = None,
) -> None:
    """GRAIN vs its baselines on the synthetic binding world: the same data, towers, steps and batch for every
    model; every model scored in every mode it has (names, descriptions, class-name-free descriptors and their
    composed sentence, waffle, region scorers over an α sweep, the swap test, held-out caption retrieval); runs
    are (world, seed) pairs, reported as the mean over worlds with world and seed spread apart; plots; a Markdown
    report (docs/results.md). Finished runs are reused by fingerprint, so an interrupted benchmark resumes where
    it stopped."""
    from grain.evaluate.science import load_bench, run_bench
    from grain.stages import workdir_path

    try:
        spec = load_bench(bench, quick, set_ or [], worlds)
        spec.select(models.split(",") if models else None, [int(x) for x in seeds.split(",")] if seeds else None)
    except (ConfigError, ValueError) as exc:
        _fail(exc)
    target = out or (workdir_path(spec.config()) / "science.md" if quick else Path("docs/results.md"))
    command = " ".join(["grain bench science", *sys.argv[3:]])
    try:
        results = run_bench(spec, target, jobs=jobs, threads=threads, command=command.strip())
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(f"bench science: {len(results['runs'])} runs in {results['wall_seconds'] / 60:.1f} min -> {target}")


@app.command("composite")
def composite(
    out: Annotated[Path, typer.Argument(help="Folder to write the world to (train/ shards, eval/ sets, world.json).")],
    seed: Annotated[int, typer.Option(help="Seed of the training and evaluation images.")] = 0,
    num_train: Annotated[int, typer.Option(help="Training images (1-3 stamps each).")] = 3000,
    size: Annotated[int, typer.Option(help="Long side of every image in px (aspect 4:3, 1:1 or 3:4).")] = 128,
    heldout: Annotated[Optional[list[str]], typer.Option(help="A held-out category (folder under the stamps root, "
                                                         "e.g. animals/birds, or its class name); repeat it. Default: a fraction.")] = None,
    heldout_fraction: Annotated[float, typer.Option(help="Share of the usable categories held out (without --heldout).")] = 0.25,
    split_seed: Annotated[int, typer.Option(help="Seed of the held-out draw and of the background split.")] = 0,
    eval_per_class: Annotated[int, typer.Option(help="Evaluation images per category (seen and held-out sets).")] = 10,
    num_retrieval: Annotated[int, typer.Option(help="Images of the retrieval set.")] = 200,
    force: Annotated[bool, typer.Option(help="Rebuild even when OUT holds the same world.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Build the real-photo composite world (docs/real-photos.md): Debian's tuxpaint photo stamps pasted on
    mate-backgrounds photos, with exact boxes, the stamps' caption sentences as region descriptions and coarse
    captions, as img2dataset webdataset shards (ingest.source=webdataset, ingest.path=OUT/train; describe/ground
    engine reference) plus evaluation sets: eval/seen and eval/heldout (ImageFolder + descriptors JSON) and
    eval/retrieval.json (Karpathy). Needs `bash scripts/setup_composite.sh` once (apt-get)."""
    from grain.data.composite import CompositeConfig, CompositeError, build_world

    cfg = CompositeConfig(seed=seed, num_train=num_train, size=size, heldout=tuple(heldout or ()),
                          heldout_fraction=heldout_fraction, split_seed=split_seed, eval_per_class=eval_per_class,
                          num_retrieval=num_retrieval)
    try:
        manifest = build_world(cfg, out, progress=progress, force=force)
    except CompositeError as exc:
        _fail(exc)
    typer.echo(f"composite world in {out}: {manifest['counts']['train_images']} training images from "
               f"{len(manifest['seen'])} seen categories; held out: {', '.join(sorted(manifest['heldout'].values()))}")


@app.command("describe-classes")
def describe_classes(
    classes: Annotated[Path, typer.Argument(help="Text file with one class name per line (index = label).")],
    out: Annotated[Path, typer.Option(help="DCLIP-format JSON to write.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Ask the describe engine (describe.engine: openai, transformers or vllm) for visual descriptors of each class
    name and write DCLIP-format JSON {class: list of descriptors} for description-based zero-shot evaluation."""
    from grain.annotate.classes import describe_classes as run

    cfg = _load(config, set_)
    try:
        names = [line.strip() for line in classes.read_text().splitlines() if line.strip()]
        result = run(cfg.describe, names, progress=progress, ray_cfg=cfg.ray)
    except (FileNotFoundError, ValueError) as exc:
        _fail(exc)
    out.write_text(result.to_json() + "\n")
    typer.echo(f"wrote {out}: {len(names)} classes, {sum(len(v) for v in result.descriptors.values())} descriptors"
               + (f"; {len(result.errors)} failed: {', '.join(list(result.errors)[:5])}" if result.errors else ""))
    if result.errors:
        raise typer.Exit(1)


@app.command("run")
def run_pipeline(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    launcher: Annotated[str, typer.Option(help="Training launcher: local or ray.")] = "local",
) -> None:
    """Run the full pipeline (ingest → describe → ground → train → evaluate → report) as the Prefect flow `grain`,
    in this process. Without PREFECT_API_URL, Prefect's temporary local server is started for the run (and stopped);
    with it, the run shows in that server's UI. Finished stages are Cached; an interrupted stage resumes where it
    stopped. Stages the config does not need (e.g. describe/ground for train.mode=clip without rewrites) are skipped."""
    cfg = _load(config, set_)  # config errors before anything starts
    from grain import stages

    try:
        stages.preflight(cfg, "evaluate")
    except ValueError as exc:
        _fail(exc)
    from grain.flows.server import start_temporary_server_unless_configured

    server = start_temporary_server_unless_configured()  # starts now, while the flow code below is imported
    from grain.flows.pipeline import full_pipeline

    if server is not None:
        server.wait_healthy()
    result = full_pipeline(str(config.absolute()) if config else None, list(set_ or []), launcher=launcher)
    for line in run_summary(result, temporary_server=server is not None):
        typer.echo(line)


def run_summary(result: dict, temporary_server: bool = False) -> list[str]:
    """The main job's terminal output, one screen: what ran, each model's best mode per eval set with chance and
    the gap to the baselines, and where everything else is (the full tables stay in the report and the Prefect
    artifact)."""
    import os

    from grain.evaluate.run import headline_lines

    stages = result.get("stages") or {}
    ran = [s for s, how in stages.items() if how == "ran"]
    cached = [s for s, how in stages.items() if how == "cached"]
    lines = [f"grain run finished in {result.get('seconds', 0):.0f} s: ran {', '.join(ran) or 'nothing'}"
             + (f"; cached {', '.join(cached)}" if cached else ""), ""]
    evals = {result.get("mode", "model"): result["eval"], **result.get("baselines", {})}
    lines += headline_lines(evals, main=result.get("mode", "model"))
    lines += ["", f"Full report (every mode of every model, the α sweeps, the cost model): {result['report']}"]
    if result.get("train"):
        lines.append(f"Loss curve: {Path(result['train']) / 'loss_curve.png'}; "
                     f"TensorBoard: tensorboard --logdir {Path(result['train']) / 'tb'}")
    if result.get("contact_sheet"):
        lines.append(f"Boxes of the ground stage (contact sheet): {result['contact_sheet']}")
    api = None if temporary_server else os.environ.get("PREFECT_API_URL")
    lines.append(f"Prefect UI: {api.removesuffix('/api')} (flow runs, stage artifacts)" if api else
                 "Prefect UI: this run used a temporary server; `prefect server start` + `grain serve` keeps runs "
                 "in the UI (README)")
    return lines


@app.command()
def serve(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    limit: Annotated[Optional[int], typer.Option(help="Flow runs at once (default: no limit).")] = None,
) -> None:
    """Register and serve the deployments grain/full-pipeline and one per stage (grain-ingest/ingest, …) against
    the Prefect server in PREFECT_API_URL; then `prefect deployment run grain/full-pipeline --watch` runs it.

    --config and --set become the deployments' defaults (the parameters config and base_overrides); a run adds its
    own overrides on top: `prefect deployment run grain/full-pipeline --param 'overrides=["train.steps=40"]'`.
    A relative workdir is made absolute here, so runs write where this command was started."""
    from grain import stages
    from grain.flows.serve import serve_all

    cfg = _load(config, set_)
    base = list(set_ or []) + [f"workdir={stages.workdir_path(cfg)}"]
    serve_all(str(config.absolute()) if config else None, base, limit=limit)


@app.command()
def inspect(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    samples: Annotated[Optional[Path], typer.Option(help="samples/ folder; default: the one ingest writes for this config.")] = None,
    regions: Annotated[Optional[Path], typer.Option(help="regions/ folder; default: the one ground writes for this config.")] = None,
    ground_truth: Annotated[bool, typer.Option("--ground-truth", help="Draw the samples' own ground-truth regions instead of regions/.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="PNG to write; default <workdir>/inspect/<regions fingerprint>.png.")] = None,
    n: Annotated[int, typer.Option("-n", help="Images on the sheet.")] = 16,
    columns: Annotated[int, typer.Option(help="Images per row.")] = 4,
    cell: Annotated[int, typer.Option(help="Cell size in pixels.")] = 256,
    seed: Annotated[int, typer.Option(help="Which images: a seeded sample.")] = 0,
    min_score: Annotated[float, typer.Option(help="Hide boxes scoring below this.")] = 0.0,
) -> None:
    """Render a contact sheet PNG: sample images with their boxes and description labels, for checking annotations."""
    from grain import stages
    from grain.annotate.inspect_sheet import render_contact_sheet

    cfg = _load(config, set_)
    try:
        step = stages.plan(cfg, "ground", {"samples": samples, "regions": regions})
        samples_dir = step.inputs["samples"]
        regions_dir = None if ground_truth else (regions or step.out)
        target = out or stages.inspect_sheet_path(cfg, regions_dir, samples_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        path = render_contact_sheet(samples_dir, regions_dir, target, n=n, columns=columns, cell=cell, seed=seed, min_score=min_score)
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(f"wrote {path}")


def _report(summary: dict) -> None:
    work = f"ran {len(summary['shards_run'])} shard(s), skipped {len(summary['shards_skipped'])} finished"
    typer.echo(f"{summary['stage']}: {work} in {summary['seconds']:.2f}s")
    if summary["complete"]:
        t = summary["totals"]
        q = sum(t["quarantined"].values())
        typer.echo(f"  rows in {t['rows_in']}, out {t['rows_out']}, quarantined {q} {t['quarantined'] or ''}".rstrip())
        if t.get("normalised"):
            typer.echo(f"  kept after normalising: {t['normalised']} (meta.grain_normalised says which rows)")
        if t.get("skipped_members"):
            typer.echo(f"  tar members skipped (not rows): {t['skipped_members']}")
        for warning in t.get("warnings", []):
            typer.echo(f"  warning: {warning}")
        if "store_hits" in t:  # describe, ground: what the engine computed vs what came from the annotation store
            computed = t.get("requests", t.get("detector_calls", 0))
            what = "engine requests" if "requests" in t else "images through the detector"
            typer.echo(f"  {what}: {computed} (this run); answered by the annotation store: {t['store_hits']}; "
                       f"duplicates sent once: {t.get('deduplicated', 0)}")
    else:
        typer.echo("  stage incomplete: other ranks still have shards to run")
    typer.echo(f"  output: {summary['out']}")


@app.command("config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the fully resolved config (every default spelled out) as YAML."""
    cfg = _load(config, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip())


@app.command()
def stats(folder: Annotated[Path, typer.Argument(help="A stage output folder, e.g. runs/default/samples/<fp>.")]) -> None:
    """Summarise a stage folder: shards done, row counts, quarantine reasons with an example each; for describe
    also the rows described, with no usable description and with an error (an example uid each)."""
    from grain.shards import SUCCESS_FILE, iter_markers, read_json

    if not (folder / "_stage.json").exists():
        typer.echo(f"error: {folder} is not a stage folder (no _stage.json)", err=True)
        raise typer.Exit(2)
    header = read_json(folder / "_stage.json")
    markers = list(iter_markers(folder))
    typer.echo(f"{header['stage']} {header['fingerprint']}: {len(markers)}/{header['num_shards']} shards done"
               + (" (complete)" if (folder / SUCCESS_FILE).exists() else ""))
    rows_in = sum(m["rows_in"] for m in markers)
    rows_out = sum(m["rows_out"] for m in markers)
    typer.echo(f"  rows in {rows_in}, out {rows_out}, quarantined {rows_in - rows_out}")
    if header["stage"] == "describe":
        from grain.annotate.describe import format_counts, summarize

        typer.echo(f"  {format_counts(summarize(folder))}")
    quarantine = sorted((folder / "quarantine").glob("part-*.parquet"))
    if quarantine:
        import pyarrow.parquet as pq

        examples: dict[str, tuple[int, str]] = {}
        for part in quarantine:
            for row in pq.read_table(part, columns=["uid", "reason", "detail"]).to_pylist():
                n, detail = examples.get(row["reason"], (0, row["detail"]))
                examples[row["reason"]] = (n + 1, detail)
        for reason, (n, detail) in sorted(examples.items()):
            typer.echo(f"  {reason}: {n}  e.g. {detail}")
    normalised: dict[str, int] = {}
    skipped: dict[str, int] = {}
    for m in markers:
        for key, n in (m.get("normalised") or {}).items():
            normalised[key] = normalised.get(key, 0) + n
        for key, n in (m.get("skipped_members") or {}).items():
            skipped[key] = skipped.get(key, 0) + n
    if normalised:
        typer.echo(f"  kept after normalising: {dict(sorted(normalised.items()))}")
    if skipped:
        typer.echo(f"  tar members skipped (not rows): {dict(sorted(skipped.items()))}")
    for m in markers:
        for warning in m.get("warnings") or []:
            typer.echo(f"  warning: {m['shard']}: {warning}")


@app.command()
def descriptors(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    which: Annotated[str, typer.Option(help="unseen | seen | all")] = "unseen",
    out: Annotated[Optional[Path], typer.Option(help="Write here instead of stdout.")] = None,
) -> None:
    """Write the synthetic world's class descriptors as DCLIP-format JSON: one key per class name, a list of part descriptions each."""
    from grain.data import synthetic

    if which not in ("unseen", "seen", "all"):
        typer.echo(f"error: --which must be one of unseen, seen, all (got {which!r})", err=True)
        raise typer.Exit(2)
    s = _load(config, set_).ingest.synthetic
    world = synthetic.build_world(s.seed, s.num_seen_classes, s.num_unseen_pairs)
    text = json.dumps(world.descriptors(which), indent=1)
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text + "\n")
        typer.echo(f"wrote {out}")


@app.command("export")
def export_model(
    model: Annotated[Path, typer.Argument(help="A grain model folder (grain_model.json) or a train run folder.")],
    out: Annotated[Path, typer.Argument(help="Folder to write the open_clip model into.")],
    format_: Annotated[str, typer.Option("--format", help="open_clip: the towers as an open_clip model.")] = "open_clip",
    name: Annotated[Optional[str], typer.Option(help="Model config name for open_clip.add_model_config "
                                                "(default grain-<mode>-<content hash>).")] = None,
) -> None:
    """Hand a trained model's towers to open_clip: OUT/open_clip_config.json + open_clip_model.safetensors (load with
    open_clip.create_model("local-dir:OUT"), or `clip_benchmark eval --model local-dir:OUT`) and OUT/<name>.json
    (for open_clip.add_model_config). open_clip's factory loads the export back and its embeddings are checked
    against grain's before this reports success. A GRAIN (decoder) model's image embedding comes from its query
    decoder, which open_clip cannot hold: open_clip then computes the vision tower's CLS embedding (docs/models.md)."""
    from grain.train.openclip_io import export_open_clip

    if format_ != "open_clip":
        _fail(ValueError(f"--format must be open_clip, got {format_!r}"))
    try:
        done = export_open_clip(model, out, name=name)
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(f"exported {model} as open_clip model {done['name']!r} -> {done['out']}")
    typer.echo(f"  files: {', '.join(done['files'])}")
    typer.echo(f"  checked: open_clip's factory loads it; embeddings equal grain's towers to {max(done['max_image_diff'], done['max_text_diff']):.1e}")
    typer.echo(f"  use: open_clip.create_model_and_transforms('local-dir:{done['out']}')  |  "
               f"clip_benchmark eval --model local-dir:{done['out']} --pretrained none ...")
    if done["decoder_dropped"]:
        typer.echo(f"  warning: a {done['mode']} model's image embedding comes from its query decoder, which is not part "
                   "of an open_clip model: open_clip computes the vision tower's CLS embedding instead, which GRAIN "
                   "does not train as the image embedding. Text embeddings are the model's own. For GRAIN's image "
                   "embedding in open_clip-based tools use grain.load_model (docs/models.md).", err=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()


# ------------------------------------------------------------------------------------------------ grain cache

cache_app = typer.Typer(help="The annotation store (docs/annotation-store.md): describe replies and ground results "
                             "kept by content, shared by every workdir.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

RootOpt = Annotated[Optional[Path], typer.Option("--root", help="Store folder; default: the annotation_cache of "
                                                 "--config (auto: $GRAIN_ANNOTATION_CACHE or ~/.cache/grain/annotations).")]


def _store_root(root: Path | None, config: Path | None, set_: list[str] | None) -> Path:
    from grain.annotate.store import resolve_root

    if root is not None:
        return root
    resolved = resolve_root(_load(config, set_).annotation_cache)
    if resolved is None:
        _fail(ValueError("annotation_cache is off; pass --root FOLDER to inspect a store"))
    return resolved


@cache_app.command("stats")
def cache_stats(root: RootOpt = None, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """One line per namespace (engine, model and prompt settings): segments, keys, bytes, oldest and newest."""
    from grain.annotate.store import stats as store_stats

    folder = _store_root(root, config, set_)
    rows = store_stats(folder)
    typer.echo(f"annotation store {folder}: {len(rows)} namespace(s), {sum(r['keys'] for r in rows)} key(s), "
               f"{sum(r['bytes'] for r in rows) / 1e6:.1f} MB")
    for r in rows:
        typer.echo(f"  {r['kind']:8s} {r['namespace']}  model={r['model']}  prompt={r['prompt_id']}  "
                   f"{r['segments']} segment(s), {r['keys']} key(s), {r['bytes'] / 1e6:.2f} MB, {r['oldest']} .. {r['newest']}")


@cache_app.command("verify")
def cache_verify(root: RootOpt = None, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Check every segment: Parquet footer and page checksums, sha256 keys, JSON values, the index sidecar.
    Exit 1 naming each segment that fails (a damaged segment is skipped by lookups; `prune` can drop it)."""
    from grain.annotate.store import verify

    folder = _store_root(root, config, set_)
    checked, problems = verify(folder)
    for p in problems:
        typer.echo(f"bad: {p}", err=True)
    typer.echo(f"annotation store {folder}: {checked} segment(s) checked, {len(problems)} problem(s)")
    if problems:
        raise typer.Exit(1)


@cache_app.command("prune")
def cache_prune(
    root: RootOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[Optional[str], typer.Option(help="Drop the entries of this model.")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Drop the entries of this prompt id (e.g. describe+rewrite@1a2b3c4d).")] = None,
    kind: Annotated[Optional[str], typer.Option(help="Only describe or ground entries.")] = None,
    older_than_days: Annotated[Optional[float], typer.Option(help="Drop segments older than this many days.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Say what would go; delete nothing.")] = False,
) -> None:
    """Delete stored entries by model, prompt, kind or age (filters combine), and writers' leftover temp files."""
    from grain.annotate.store import prune

    folder = _store_root(root, config, set_)
    if kind not in (None, "describe", "ground"):
        _fail(ValueError(f"--kind must be describe or ground, got {kind!r}"))
    done = prune(folder, model=model, prompt_id=prompt, kind=kind, older_than_days=older_than_days, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    typer.echo(f"annotation store {folder}: {verb} {done['segments']} segment(s) ({done['keys']} key(s), "
               f"{done['bytes'] / 1e6:.2f} MB) and {done['temp_files']} temp file(s)")
