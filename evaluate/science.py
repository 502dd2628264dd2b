"""The science benchmark (``grain bench science``): GRAIN against its baselines on the same data, fairly scored.

A benchmark file (``configs/bench/science.yaml``) names a pipeline config shared by every model (the data, towers,
steps, batch and evaluation), the models (each a list of dotted overrides, e.g. ``train.mode=clip_desc``) and the
seeds. For every (model, seed) the runner plans the train and evaluate stages through the stage registry
(grain.stages.plan) — so finished runs are reused by fingerprint and an interrupted benchmark resumes — trains
with ``train.eval_every`` on (accuracy-vs-step curves), evaluates every mode, then writes a report: mean ± std over
seeds, the GRAIN − baseline gaps per seed, the α sweep, plots (matplotlib), commands, commit, machine and wall time.

``--quick`` applies the file's ``quick`` overrides (tiny data and steps): the CI smoke form, which checks only that
every model trains, every mode evaluates and the report is written.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from grain.config import ConfigError, PipelineConfig, config_from_dict
from grain.evaluate.run import HEADLINE_METRIC

RESULTS_JSON = "results.json"


# ------------------------------------------------------------------------------------------------ the bench file


@dataclass
class BenchModel:
    name: str
    overrides: list[str]
    seeds: list[int]
    summary: str = ""
    worlds: list[int | None] = field(default_factory=lambda: [None])  #: synthetic world seeds it runs on


@dataclass
class Bench:
    path: Path
    pipeline: dict[str, Any]
    overrides: list[str]
    models: list[BenchModel]
    headline: tuple[str, str]
    jobs: int
    bar: dict[str, float] = field(default_factory=dict)
    quick: bool = False
    extra: list[str] = field(default_factory=list)  # the command line's --set overrides (part of overrides)
    headline_mode: dict[str, str] = field(default_factory=dict)  # task -> the headline model's declared mode
    #: the world the data comes from: None = the pipeline's own source (the synthetic world); else a builder spec
    #: ({kind: composite, out: folder, …}) run before anything is planned; "{world}" in the pipeline is its folder
    world: dict[str, Any] | None = None
    section: str = "synthetic"  # results.md section (and results-<section>.json) this benchmark writes
    title: str = "Synthetic binding world"
    #: the synthetic world seeds (ingest.synthetic.seed) runs are made on: [None] = the pipeline's own
    worlds: list[int | None] = field(default_factory=lambda: [None])
    world_set: str = ""  #: which of the file's world lists was chosen ("test", "dev") or "" (given by number)
    world_choice: str | None = None  #: the command line's --worlds (worker processes re-read the file with it)

    def runs(self) -> list[tuple[str, int | None, int]]:
        """Every (model, world, seed) to train and evaluate."""
        return [(m.name, w, s) for m in self.models for w in m.worlds for s in m.seeds]

    def select(self, models: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> None:
        """Keep only ``models`` (names) and ``seeds``; raises ConfigError for an unknown name, a dropped headline
        model or a model left without seeds."""
        if models is not None:
            names = [m.name for m in self.models]
            unknown = [m for m in models if m not in names]
            if unknown:
                raise ConfigError(f"{self.path}: unknown model(s) {unknown}; the file has {names}")
            missing = [h for h in self.headline if h not in models]
            if missing:
                raise ConfigError(f"--models must include the headline models {list(self.headline)}")
            self.models = [m for m in self.models if m.name in models]
        if seeds is not None:
            for m in self.models:
                m.seeds = [s for s in m.seeds if s in seeds]
            self.models = [m for m in self.models if m.seeds]
            if any(h not in {m.name for m in self.models} for h in self.headline):
                raise ConfigError(f"--seeds {list(seeds)} leaves a headline model {list(self.headline)} without seeds")

    def config(self, model: BenchModel | None = None, seed: int | None = None, extra: Sequence[str] = (),
               world: int | None = None) -> PipelineConfig:
        """The pipeline config of one run: the file's, the command line's, the model's overrides, its seed and its
        synthetic world (``ingest.synthetic.seed``; evaluate's synthetic splits follow it)."""
        overrides = list(self.overrides) + list(extra)
        if model is not None:
            overrides += model.overrides
        if seed is not None:
            overrides.append(f"train.seed={seed}")
        if world is not None:
            overrides.append(f"ingest.synthetic.seed={world}")
        return config_from_dict(self.pipeline, overrides, where=str(self.path))


def _pick_worlds(path: Path, raw: Any, choice: str | None) -> tuple[list[int | None], str]:
    """The world seeds to run on: the file's ``worlds`` (a list, or named lists such as ``test`` and ``dev``) and
    the command line's choice (a list name, or comma-separated seeds). Default: ``test``."""
    if raw is None:
        if choice:
            raise ConfigError(f"{path}: --worlds {choice!r}: this benchmark has no worlds section")
        return [None], ""
    named = {str(k): v for k, v in raw.items()} if isinstance(raw, dict) else {"": raw}
    if choice and choice in named:
        name = choice
    elif choice:
        try:
            return [int(x) for x in choice.split(",")], ""
        except ValueError:
            raise ConfigError(f"{path}: --worlds {choice!r}: not one of {sorted(named)} nor comma-separated seeds") from None
    else:
        name = "test" if "test" in named else next(iter(named))
    worlds = named[name]
    if not isinstance(worlds, list) or not worlds or not all(isinstance(w, int) for w in worlds):
        raise ConfigError(f"{path}: worlds{'.' + name if name else ''} must be a non-empty list of integer seeds")
    return list(worlds), name


def load_bench(path: str | Path, quick: bool = False, overrides: Sequence[str] = (), worlds: str | None = None) -> Bench:
    """Read a benchmark file; ``quick`` applies its ``quick`` section (overrides, seeds and worlds); ``worlds``
    picks the synthetic worlds (a name of the file's ``worlds`` lists, or comma-separated seeds; default test)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"benchmark file not found: {path}") from None
    known = {"pipeline", "set", "seeds", "models", "headline", "headline_mode", "jobs", "quick", "bar", "world",
             "section", "title", "worlds"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    seeds = [int(s) for s in raw.get("seeds", [0])]
    base = list(raw.get("set", []))
    given = list(overrides)  # re-read by worker processes, world overrides included
    world_overrides = [o for o in overrides if o.startswith("world.")]  # e.g. --set world.out=/tmp/w
    overrides = [o for o in overrides if not o.startswith("world.")]
    q = raw.get("quick", {}) or {}
    chosen, world_set = _pick_worlds(path, raw.get("worlds"), worlds)
    if quick:
        base += list(q.get("set", []))
        seeds = [int(s) for s in q.get("seeds", seeds)]
        if not worlds:
            chosen = [int(w) for w in q["worlds"]] if q.get("worlds") else chosen[:1]
    models = []
    for name, spec in (raw.get("models") or {}).items():
        spec = spec or {}
        own = [int(s) for s in spec.get("seeds", seeds)]
        if quick:
            own = [s for s in own if s in seeds] or seeds[:1]
        own_worlds = spec.get("worlds", "all")
        if own_worlds not in ("all", "first"):
            raise ConfigError(f"{path}: models.{name}.worlds must be 'all' or 'first', got {own_worlds!r}")
        models.append(BenchModel(str(name), list(spec.get("set", [])), own, str(spec.get("summary", "")),
                                 chosen[:1] if own_worlds == "first" else list(chosen)))
    if not models:
        raise ConfigError(f"{path}: no models")
    headline = tuple(raw.get("headline", [models[0].name, models[-1].name]))
    names = [m.name for m in models]
    for h in headline:
        if h not in names:
            raise ConfigError(f"{path}: headline model {h!r} is not one of the models {names}")
    world = dict(raw["world"]) if raw.get("world") else None
    pipeline = raw.get("pipeline") or {}
    if world is None and world_overrides:
        raise ConfigError(f"{path}: {world_overrides[0]!r}: this benchmark has no world section")
    if world is not None:
        if world.get("kind") != "composite" or not world.get("out"):
            raise ConfigError(f"{path}: world needs kind: composite and out: <folder>")
        if quick:
            world.update(q.get("world") or {})
        for o in world_overrides:
            key, _, value = o[len("world."):].partition("=")
            world[key] = yaml.safe_load(value)
        pipeline = _substitute(pipeline, str(world["out"]))
        base = [_substitute(o, str(world["out"])) for o in base]
    bench = Bench(path, pipeline, base + list(overrides), models, headline,  # type: ignore[arg-type]
                  int(raw.get("jobs", 1)), {k: float(v) for k, v in (raw.get("bar") or {}).items()}, quick,
                  given, {str(k): str(v) for k, v in (raw.get("headline_mode") or {}).items()},
                  world, str(raw.get("section", "synthetic")), str(raw.get("title", "Synthetic binding world")),
                  chosen, world_set, worlds)
    for m in models:  # every model's config must validate before anything runs
        bench.config(m, m.seeds[0], world=m.worlds[0])
    return bench


def _substitute(value: Any, world: str) -> Any:
    """``"{world}"`` in every string of ``value`` (nested dicts/lists) replaced by the world's folder."""
    if isinstance(value, str):
        return value.replace("{world}", world)
    if isinstance(value, list):
        return [_substitute(v, world) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, world) for k, v in value.items()}
    return value


def build_bench_world(bench: Bench, progress: bool = True) -> dict[str, Any] | None:
    """Build (or reuse, when unchanged) the benchmark's world; returns its manifest (None: no world section)."""
    if bench.world is None:
        return None
    from grain.data.composite import CompositeConfig, build_world

    spec = {k: v for k, v in bench.world.items() if k not in ("kind", "out")}
    return build_world(CompositeConfig.from_dict(spec), bench.world["out"], progress=progress)


# ------------------------------------------------------------------------------------------------ running


def _run_step(cfg: PipelineConfig, step: Any, **opts: Any) -> dict[str, Any] | None:
    """Run ``step`` (its unfinished upstream first); None when it was already finished."""
    for up in step.upstream.values():
        _run_step(cfg, up)
    if step.finished:
        return None
    return step.stage.run(cfg, step.inputs, step.out, **opts)


def _job(bench_path: str, quick: bool, overrides: list[str], worlds: str | None, model: str, world: int | None,
         seed: int, threads: int) -> dict[str, Any]:
    """Train and evaluate one (model, world, seed) in this process; returns what the report needs."""
    import torch

    from grain.evaluate.run import read_results
    from grain.stages import plan

    torch.set_num_threads(threads)
    bench = load_bench(bench_path, quick, overrides, worlds)
    spec = next(m for m in bench.models if m.name == model)
    cfg = bench.config(spec, seed, world=world)
    t0 = time.perf_counter()
    train_step = plan(cfg, "train")
    trained = _run_step(cfg, train_step)
    t1 = time.perf_counter()
    eval_step = plan(cfg, "evaluate")
    evaluated = _run_step(cfg, eval_step)
    t2 = time.perf_counter()
    summary = json.loads((train_step.out / "summary.json").read_text())
    eval_summary = json.loads((eval_step.out / "summary.json").read_text())
    probe = None
    held = probe_data(cfg, run=False) if cfg.train.mode_spec.decoder else None
    if held is not None:  # do the boxes depend on the image? (held-out images, grain.train.probe)
        from grain.train.model import load_model
        from grain.train.probe import grounding_probe

        probe = grounding_probe(load_model(train_step.out / "model"), *held, batches=4, batch_size=64,
                                max_regions=cfg.train.max_regions)
    curves = []
    metrics = train_step.out / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            zs = {k: v for k, v in row.items() if k.startswith("zeroshot/")}
            if zs:
                curves.append({"step": row["step"], **zs})
    workdir = Path(cfg.workdir)
    return {"model": model, "world": world, "seed": seed, "run": _relative(train_step.out, workdir),
            "eval": _relative(eval_step.out, workdir),
            "train_seconds": summary.get("seconds"), "steps": summary.get("steps"),
            "trained_now": trained is not None, "evaluated_now": evaluated is not None,
            "wall_train": t1 - t0, "wall_eval": t2 - t1, "rows": read_results(eval_step.out), "curves": curves,
            "datasets": eval_summary.get("datasets", {}), "probe": probe}


def _relative(folder: Path, workdir: Path) -> str:
    """A run folder as the report names it: relative to the workdir (the same on every machine)."""
    try:
        return str(Path(folder).resolve().relative_to(workdir.resolve()))
    except ValueError:
        return str(folder)


def run_bench(bench: Bench, out: Path, *, jobs: int | None = None, progress: bool = True,
              command: str = "", threads: int | None = None) -> dict[str, Any]:
    """Run every (model, seed) of ``bench`` and write the report to ``out`` (a .md path); returns the results."""
    from grain.stages import plan

    t0 = time.perf_counter()
    jobs = max(1, jobs or bench.jobs)
    world = build_bench_world(bench, progress)
    cfg = bench.config(world=bench.worlds[0])
    work = bench.runs()
    for w in dict.fromkeys(w for _, w, _ in work):  # the shared data of each world, once (ingest → describe → ground)
        cfg_w = bench.config(world=w)
        _run_step(cfg_w, plan(cfg_w, "ground"))
        prepare_eval_sets(cfg_w, progress)
        probe_data(cfg_w)
    t_data = time.perf_counter() - t0
    # longest first (decoder models), so the last runs to finish are short ones and no process idles long
    work.sort(key=lambda r: not bench.config(_model(bench, r[0]), r[2], world=r[1]).train.mode_spec.decoder)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    runs: list[dict[str, Any]] = []
    args = (str(bench.path), bench.quick, list(bench.extra), bench.world_choice)
    if progress:
        print(f"bench: {len(work)} runs ({', '.join(_run_name(m, w, s) for m, w, s in work)}), {jobs} at a time", flush=True)
    if jobs == 1:
        for m, w, s in work:
            runs.append(_job(*args, m, w, s, threads))
            _report_progress(runs[-1], len(runs), len(work), progress)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_job, *args, m, w, s, threads) for m, w, s in work]
            for fut in futures:
                runs.append(fut.result())
                _report_progress(runs[-1], len(runs), len(work), progress)
    wall = time.perf_counter() - t0
    results = {"bench": str(bench.path), "quick": bench.quick, "overrides": bench.overrides, "extra": bench.extra,
               "command": command,
               "headline": list(bench.headline), "headline_mode": bench.headline_mode, "bar": bench.bar, "wall_seconds": wall, "data_seconds": t_data,
               "jobs": jobs, "machine": machine(), "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "setup": setup(cfg, world), "section": bench.section, "title": bench.title,
               "world": _world_summary(world), "worlds": bench.worlds, "world_set": bench.world_set,
               "workdir": cfg.workdir,
               "models": {m.name: {"overrides": m.overrides, "seeds": m.seeds, "summary": m.summary, "worlds": m.worlds}
                          for m in bench.models},
               "runs": runs}
    write_report(results, out)
    return results


def prepare_eval_sets(cfg: PipelineConfig, progress: bool = True) -> None:
    """Ingest the synthetic eval splits evaluate (and the training probe) would ingest on first use, once, before
    runs start in parallel: two runs must not write the same samples/ folder at once."""
    from grain.evaluate.run import _synthetic_samples

    for ds in cfg.evaluate.datasets:
        if ds.kind == "synthetic":
            _synthetic_samples(ds, cfg.ingest.synthetic, Path(cfg.workdir), progress)


#: images of the held-out split the grounding probe runs on (grain.train.probe), per world
PROBE_IMAGES = 256


def probe_data(cfg: PipelineConfig, run: bool = True) -> tuple[Path, Path, Path] | None:
    """The grounding probe's held-out data of a synthetic world: its ``distractor`` split (new images of the unseen
    classes, two creatures each), described and grounded by the reference engines, in the folders the stage
    registry plans under the workdir; ``(samples, descriptions, regions)``. None for another source."""
    from grain.config import DescribeConfig, GroundConfig
    from grain.stages import plan

    if cfg.ingest.source != "synthetic":
        return None
    syn = cfg.ingest.synthetic.model_copy(update={"split": "distractor", "num_images": PROBE_IMAGES})
    held = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"synthetic": syn, "num_shards": 2}),
                                  "describe": DescribeConfig(engine="reference"), "ground": GroundConfig(engine="reference")})
    step = plan(held, "ground")
    if run:
        _run_step(held, step)
    return step.inputs["samples"], step.inputs["descriptions"], step.out


def _model(bench: Bench, name: str) -> BenchModel:
    return next(m for m in bench.models if m.name == name)


def _run_name(model: str, world: int | None, seed: int) -> str:
    return f"{model}/seed {seed}" if world is None else f"{model}/world {world}/seed {seed}"


def _report_progress(run: dict[str, Any], done: int, total: int, enabled: bool) -> None:
    if enabled:
        how = "trained" if run["trained_now"] else "reused"
        print(f"bench: [{done}/{total}] {_run_name(run['model'], run.get('world'), run['seed'])}: {how} ({run['steps']} steps, "
              f"{run['wall_train']:.0f} s) + eval {run['wall_eval']:.0f} s", flush=True)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _world_summary(world: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the report says about a built world (not the per-file rejection list)."""
    if world is None:
        return None
    stamps = {k: v for k, v in world["stamps"].items() if k != "rejected_files"}
    return {**{k: v for k, v in world.items() if k != "stamps"}, "stamps": stamps}


def setup(cfg: PipelineConfig, world: dict[str, Any] | None = None) -> dict[str, Any]:
    syn, t = cfg.ingest.synthetic, cfg.train
    if world is None:
        data = {"train_images": syn.num_images, "image_size": syn.image_size, "seen_classes": syn.num_seen_classes,
                "unseen_classes": 2 * syn.num_unseen_pairs}
    else:
        wcfg = world["signature"]["config"]
        data = {"train_images": wcfg["num_train"], "image_size": wcfg["size"], "seen_classes": len(world["seen"]),
                "unseen_classes": len(world["heldout"])}
    return {**data, "train_image_size": (t.arch_overrides or {}).get("vision_cfg", {}).get("image_size"),
            "arch": t.arch, "arch_overrides": t.arch_overrides,
            "steps": t.steps, "batch_size": t.batch_size, "lr": t.lr, "warmup_steps": t.warmup_steps,
            "max_regions": t.max_regions, "weights": t.weights, "eval_every": t.eval_every,
            "eval_images": t.eval_images,
            "datasets": {d.name: {"kind": d.kind, "split": d.split, "images": d.num_images} for d in cfg.evaluate.datasets},
            "regions_global": cfg.evaluate.regions_global, "bind_window": cfg.evaluate.bind_window,
            "alphas": cfg.evaluate.alphas}


# ------------------------------------------------------------------------------------------------ the report


_RETRIEVAL = {"image_retrieval_recall@1": "text→image R@1", "image_retrieval_recall@5": "text→image R@5",
              "text_retrieval_recall@1": "image→text R@1", "text_retrieval_recall@5": "image→text R@5"}


RunKey = tuple  # (world seed or None, train seed)


def collect(results: dict[str, Any]) -> dict[tuple[str, str, str, str], dict[RunKey, float]]:
    """``{(model, dataset, task, mode): {(world, seed): value}}``: top-1 (classification), truth-over-foil (swap),
    and recall@1/5 in both directions (retrieval, one "mode" per metric)."""
    table: dict[tuple[str, str, str, str], dict[int, float]] = {}
    for run in results["runs"]:
        for r in run["rows"]:
            if r["task"] == "retrieval":
                if r["metric"] not in _RETRIEVAL:
                    continue
                mode = _RETRIEVAL[r["metric"]]
            elif r["metric"] == HEADLINE_METRIC[r["task"]]:
                mode = r["mode"]
            else:
                continue
            table.setdefault((run["model"], r["dataset"], r["task"], mode), {})[(run.get("world"), run["seed"])] = r["value"]
    return table


def mean_std(values: Sequence[float] | dict[RunKey, float]) -> tuple[float, float]:
    """Mean and spread. A list: over its values. Runs keyed by (world, seed): the mean over worlds of each world's
    mean over seeds, ± the std over worlds of those means (one world: the std over its seeds)."""
    if isinstance(values, dict):
        sp = spread(values)
        return sp["mean"], sp["world_std"] if sp["worlds"] > 1 else sp["seed_std"]
    values = list(values)
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def spread(values: dict[RunKey, float]) -> dict[str, Any]:
    """Runs keyed by (world, seed) → ``mean`` (over worlds of the per-world means), ``world_std`` (std over worlds
    of the per-world means: how much the result depends on the world), ``seed_std`` (root mean square over worlds
    of the std over seeds within a world: how much it depends on the training seed), ``per_world`` means,
    ``worlds`` and ``runs`` counted."""
    by: dict[Any, list[float]] = {}
    for (w, _), v in sorted(values.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        by.setdefault(w, []).append(v)
    if not by:
        return {"mean": float("nan"), "world_std": float("nan"), "seed_std": float("nan"), "per_world": {}, "worlds": 0, "runs": 0}
    means = {w: statistics.fmean(v) for w, v in by.items()}
    within = [statistics.variance(v) for v in by.values() if len(v) > 1]
    return {"mean": statistics.fmean(means.values()),
            "world_std": statistics.stdev(means.values()) if len(means) > 1 else 0.0,
            "seed_std": (statistics.fmean(within) ** 0.5) if within else 0.0,
            "per_world": means, "worlds": len(by), "runs": len(values)}


def fmt(values: Sequence[float] | dict[RunKey, float]) -> str:
    m, s = mean_std(values)
    if m != m:
        return "—"
    return f"{100 * m:.1f} ± {100 * s:.1f}" if len(values) > 1 else f"{100 * m:.1f}"


def best_mode(table: dict[tuple[str, str, str, str], dict[RunKey, float]], model: str, dataset: str, task: str,
              prefix: str = "") -> str | None:
    """The mode of ``model`` with the highest mean on (dataset, task), among modes starting with ``prefix``."""
    cands = [(mean_std(v)[0], mode) for (m, d, t, mode), v in table.items()
             if m == model and d == dataset and t == task and mode.startswith(prefix) and v]
    return max(cands)[1] if cands else None


def headline_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per eval set: the headline model in its declared mode (``headline_mode``, fixed before the run) vs the
    baseline in its *best* mode on the mean (chosen after the run: the comparison errs in the baseline's favour),
    with the gap per run ((world, seed) pairs the two share)."""
    table = collect(results)
    a, b = results["headline"]
    declared = results.get("headline_mode") or {}
    out = []
    sets = sorted({(d, t) for (m, d, t, _) in table if t in ("classification", "swap")}, key=lambda x: (x[1], x[0]))
    for dataset, task in sets:
        ma = declared.get(task)
        if ma is None or (a, dataset, task, ma) not in table:
            ma = best_mode(table, a, dataset, task)
        mb = best_mode(table, b, dataset, task)
        if ma is None or mb is None:
            continue
        va, vb = table[(a, dataset, task, ma)], table[(b, dataset, task, mb)]
        shared = sorted(set(va) & set(vb), key=lambda k: (str(k[0]), k[1]))
        gaps = {k: va[k] - vb[k] for k in shared}
        out.append({"dataset": dataset, "task": task, "a_mode": ma, "a": va, "b_mode": mb, "b": vb, "gap": gaps,
                    "runs": shared})
    return out


#: results.md sections, in order: (section, results file in the assets folder)
SECTIONS = (("synthetic", RESULTS_JSON), ("real", "results-real.json"))
COST_JSON = "cost.json"
DECODERS_JSON = "decoders.json"  # bench/decoders.py: step time and FLOPs of each region decoder


def results_file(section: str) -> str:
    return dict(SECTIONS).get(section, f"results-{section}.json")


def write_report(results: dict[str, Any], out: Path) -> Path:
    """Store ``results`` as its section's JSON in ``<out stem>/`` (with its plots), then write ``out`` (Markdown)
    from every section stored there — the synthetic world, the real-photo composites, the cost model
    (``cost.json``, bench/cost_model.py) — so one benchmark's rerun regenerates the whole page without rerunning
    the others."""
    out = Path(out)
    assets = out.parent / out.stem
    assets.mkdir(parents=True, exist_ok=True)
    section = results.get("section", "synthetic")
    (assets / results_file(section)).write_text(json.dumps(results, indent=1, default=str))
    return render_report(out)


def render_report(out: Path) -> Path:
    """``out`` from the section files in ``<out stem>/`` (see write_report)."""
    out = Path(out)
    assets = out.parent / out.stem
    stored = []
    known = [f for _, f in SECTIONS]
    files = known + sorted(f.name for f in assets.glob("results-*.json") if f.name not in known)
    for name in files:
        if (assets / name).exists():
            stored.append(json.loads((assets / name).read_text()))
    quick = any(r.get("quick") for r in stored)
    lines = [f"# Results: GRAIN vs its baselines{' (quick)' if quick else ''}", "",
             "Generated by `grain bench science` (and `bench/cost_model.py` for the cost model) — do not edit by "
             "hand; rerun the commands each section names to regenerate it. Sections: "
             + ", ".join(f"[{r.get('title', 'Synthetic binding world')}](#{_anchor(r.get('title', 'Synthetic binding world'))})" for r in stored)
             + (", [Decoders](#decoders-accuracy-step-time-and-flops)" if (assets / DECODERS_JSON).exists() else "")
             + (", [Cost at scale](#cost-at-scale)" if (assets / COST_JSON).exists() else "") + ".", ""]
    for results in stored:
        lines += _section_lines(results, assets)
    if (assets / DECODERS_JSON).exists():
        synthetic = next((r for r in stored if r.get("section", "synthetic") == "synthetic"), None)
        lines += _decoder_lines(assets / DECODERS_JSON, synthetic)
    if (assets / COST_JSON).exists():
        lines += _cost_lines(assets / COST_JSON)
    out.write_text("\n".join(lines))
    return out


def _decoder_lines(path: Path, synthetic: dict[str, Any] | None) -> list[str]:
    """The decoder table: each region decoder's accuracy in the synthetic benchmark (its model there, declared
    mode) beside its step time and FLOPs against CLIP (bench/decoders.py)."""
    try:
        data = json.loads(path.read_text())
        table = collect(synthetic) if synthetic else {}
        mode = (synthetic or {}).get("headline_mode", {}).get("classification", "regions-bind@0")
        swap_mode = (synthetic or {}).get("headline_mode", {}).get("swap", "regions-bind@0")
        lines = ["## Decoders: accuracy, step time and FLOPs", "",
                 f"Accuracy: the synthetic benchmark above (`{mode}`; mean ± spread over the model's runs, percent). "
                 f"Cost: `.venv/bin/python bench/decoders.py` ({data['date']}, commit {data['machine'].get('commit', '?')}, "
                 f"{data['machine'].get('cpu', '?')}, {data['threads']} torch threads): `{data['arch']}` towers with "
                 f"{data['towers']}, batch {data['batch_size']} ({data['descriptions_per_batch']:.0f} descriptions per "
                 f"batch), every model through the training loop's own step on the same batches, median of "
                 f"{data['rounds']} rounds × {data['steps']} steps; FLOPs counted by grain.costs' FlopCounterMode on "
                 f"the same steps. CLIP (ours): {data['clip']['ms_per_step']:.1f} ms, "
                 f"{data['clip']['flops_per_step'] / 1e9:.2f} GFLOP per step.", "",
                 "| decoder | queries | model | single | distractor | swap test | ms/step | GFLOP/step | time ratio | FLOP ratio | time / FLOP ratio | FLOP ratio at grain-vit-b16 |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in data["decoders"].items():
            model = r["bench_model"]
            acc = [fmt(table.get((model, d, t, m), {})) for d, t, m in
                   (("single", "classification", mode), ("distractor", "classification", mode), ("swap", "swap", swap_mode))]
            paper = (data.get("paper_size") or {}).get(name)
            big = f"{paper['flop_ratio']:.3f} ({paper['queries']} queries)" if paper else "—"
            lines.append(f"| `{name}` | {r['queries']} | `{model}` | {' | '.join(acc)} | {r['ms_per_step']:.1f} | "
                         f"{r['flops_per_step'] / 1e9:.2f} | {r['time_ratio']:.2f} | {r['flop_ratio']:.2f} | "
                         f"{r['time_over_flops']:.2f} | {big} |")
        lines += ["", f"Time ratio = GRAIN / CLIP step time; FLOP ratio = GRAIN / CLIP FLOPs per step; the target is "
                  f"time / FLOP ratio ≤ {data['target_time_over_flops']} (the decoder costs what its arithmetic costs). "
                  "At grain-vit-b16 size: FLOPs per step against CLIP on the same towers at grain.costs' defaults "
                  "(batch 128, 5 descriptions per image, 77-token texts; meta device).", ""]
        return lines
    except Exception as exc:  # the decoder table must never break the benchmark's report
        return ["## Decoders: accuracy, step time and FLOPs", "", f"(could not render {path}: {type(exc).__name__}: {exc})", ""]


def _anchor(title: str) -> str:
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c == "-")


def _cost_lines(path: Path) -> list[str]:
    """The cost model's section as bench/cost_model.py rendered it (grain.costs.markdown_lines), with its provenance."""
    try:
        data = json.loads(path.read_text())
        m = data.get("machine") or {}
        lines = data["markdown"].splitlines()
        return lines + ["", f"Generated by `.venv/bin/python bench/cost_model.py` ({data.get('date', '?')}, commit "
                        f"{m.get('commit', '?')}, {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
                        f"{data.get('seconds', 0):.0f} s); docs/cost-model.md explains every assumption.", ""]
    except Exception as exc:  # the cost section must never break the benchmark's report
        return ["## Cost at scale", "", f"(could not render {path}: {type(exc).__name__}: {exc})", ""]


def _chance(results: dict[str, Any], dataset: str, task: str) -> str:
    if task == "swap":
        return "50"
    for run in results["runs"]:
        info = (run.get("datasets") or {}).get(dataset)
        if info and info.get("classes"):
            return f"{100 / info['classes']:.1f}"
    return f"{100 / max(results['setup']['unseen_classes'], 1):.0f}"


def _section_lines(results: dict[str, Any], assets: Path) -> list[str]:
    table = collect(results)
    a, b = results["headline"]
    st = results["setup"]
    section = results.get("section", "synthetic")
    title = results.get("title", "Synthetic binding world")
    world = results.get("world")
    datasets_info: dict[str, Any] = {}
    for run in results["runs"]:
        datasets_info.update(run.get("datasets") or {})

    def describe(name: str, d: dict[str, Any]) -> str:
        info = datasets_info.get(name, {})
        if d.get("kind", "synthetic") == "synthetic":
            return f"{name}: {d['split']} split, {d['images']} images"
        size = f"{info.get('images', '?')} images" + (f", {info['classes']} classes" if info.get("classes") else "")
        return f"{name}: {d.get('kind')}, {size}"

    if world is None:
        data_line = (f"- data: {st['train_images']} training images ({st['image_size']} px, {st['seen_classes']} seen "
                     f"classes); zero-shot on the {st['unseen_classes']} unseen classes (chance "
                     f"{100 / max(st['unseen_classes'], 1):.1f} %), ")
    else:
        data_line = (f"- data: {st['train_images']} composite training images (long side {st['image_size']} px, "
                     f"trained at {st.get('train_image_size') or st['image_size']} px) from {st['seen_classes']} seen "
                     f"categories; {st['unseen_classes']} held-out categories never pasted in training; ")
    lines = [f"## {title}{' (quick)' if results['quick'] else ''}", "",
             f"- command: `{results['command'] or 'grain bench science'}`",
             f"- commit {results['commit']}, {results['date']}; wall time {results['wall_seconds'] / 60:.1f} min "
             f"({results['jobs']} runs at a time; data stages {results['data_seconds']:.0f} s)",
             f"- machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
             f"{results['machine']['memory_gib']} GiB, torch {results['machine']['torch']}"
             + (f", GPU {results['machine']['gpu']}" if results['machine'].get('gpu') else ", no GPU"),
             data_line + ", ".join(describe(k, v) for k, v in st["datasets"].items()),
             f"- every model: arch `{st['arch']}` {st['arch_overrides'] or ''}, {st['steps']} steps, batch "
             f"{st['batch_size']}, lr {st['lr']}, warm-up {st['warmup_steps']}, max_regions {st['max_regions']}, "
             f"loss weights {st['weights']}",
             f"- region scoring: global part = `{st['regions_global']}`, bind window {st['bind_window']}, α ∈ {st['alphas']}",
             ""]
    if world is not None:
        lines += _world_lines(world)
    worlds = [w for w in results.get("worlds") or [None] if w is not None]
    if worlds:
        which = results.get("world_set")
        lines += [f"- worlds: synthetic world seeds {', '.join(map(str, worlds))}"
                  + (" — the **test** worlds, named in the benchmark file before any run; no setting was chosen on "
                     "them (settings were chosen on the `dev` worlds)" if which == "test" else
                     f" (the file's `{which}` worlds)" if which else " (chosen on the command line)")
                  + "; a run is a (world, training seed) pair", ""]
    many = len(worlds) > 1
    lines += ["### Models", "", "| model | overrides | " + ("worlds | " if worlds else "") + "seeds | what |",
              "|---|---|" + ("---|" if worlds else "") + "---|---|"]
    for name, m in results["models"].items():
        wcell = f"{', '.join(map(str, m.get('worlds') or []))} | " if worlds else ""
        lines.append(f"| `{name}` | {' '.join(f'`{o}`' for o in m['overrides']) or '—'} | {wcell}{', '.join(map(str, m['seeds']))} | {m['summary']} |")
    over = "mean over worlds ± std over worlds, percent" if many else "mean ± std over seeds, percent"
    lines += ["", f"### Headline: `{a}` vs `{b}` ({over})", "",
              f"`{a}`: the mode declared in the benchmark file before the run (`headline_mode`); `{b}`: its best "
              "mode on the mean, picked after the run among every mode it has (the class-name-free `descriptors` "
              "mode included) — a choice that favours the baseline. Gap = per-run difference"
              + (" (a run = a world and a training seed); a world's value is the mean over its seeds. Spread: "
                 "the std over worlds of the per-world means, and the seed spread (root mean square over worlds of "
                 "the std over seeds within one world)." if many else "."), ""]
    heads = headline_rows(results)
    if many:
        lines += [f"| eval set | chance | `{a}` mode | `{a}` | `{b}` mode | `{b}` | gap | `{a}` spread: worlds / seeds | gap per world |",
                  "|---|---|---|---|---|---|---|---|---|"]
    else:
        lines += [f"| eval set | chance | `{a}` mode | `{a}` | `{b}` mode | `{b}` | gap | gap per seed |",
                  "|---|---|---|---|---|---|---|---|"]
    for h in heads:
        label = f"{h['dataset']} ({h['task']})"
        row = (f"| {label} | {_chance(results, h['dataset'], h['task'])} | `{h['a_mode']}` | {fmt(h['a'])} | "
               f"`{h['b_mode']}` | {fmt(h['b'])} | {fmt(h['gap'])} | ")
        if many:
            sp, gp = spread(h["a"]), spread(h["gap"])
            row += (f"{100 * sp['world_std']:.1f} / {100 * sp['seed_std']:.1f} | "
                    + ", ".join(f"{w}: {100 * g:+.1f}" for w, g in gp["per_world"].items()) + " |")
        else:
            row += ", ".join(f"{100 * g:+.1f}" for g in h["gap"].values()) + " |"
        lines.append(row)
    if many:
        lines += ["", f"#### Per world (mean over seeds, percent: `{a}` / `{b}`)", "",
                  "| world | " + " | ".join(f"{h['dataset']} ({h['task']})" for h in heads) + " |",
                  "|---|" + "---|" * len(heads)]
        for w in worlds:
            cells = []
            for h in heads:
                pa, pb = spread(h["a"])["per_world"].get(w), spread(h["b"])["per_world"].get(w)
                cells.append("—" if pa is None or pb is None else f"{100 * pa:.1f} / {100 * pb:.1f}")
            lines.append(f"| {w} | " + " | ".join(cells) + " |")
    if results.get("bar"):
        lines += ["", "#### The bar" + (" (on the mean over worlds)" if many else ""), ""] + _bar_lines(results, heads, table)
    lines += ["", "### Every model × mode (top-1 %, swap: % of images where the truth beats the foil)", ""]
    datasets = sorted({(d, t) for (_, d, t, _) in table}, key=lambda x: (x[1] == "retrieval", x[1], x[0]))
    for dataset, task in datasets:
        modes = sorted({mode for (m, d, t, mode) in table if d == dataset and t == task},
                       key=lambda s: (s.startswith("regions"), s))
        lines += [f"#### {dataset} — {task}", "", "| model | " + " | ".join(f"`{m}`" for m in modes) + " |",
                  "|---|" + "---|" * len(modes)]
        for name in results["models"]:
            cells = [fmt(table.get((name, dataset, task, mode), {})) for mode in modes]
            if any(c != "—" for c in cells):
                lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _probe_lines(results)
    plots = make_plots(results, table, assets, prefix="" if section == "synthetic" else f"{section}_")
    if plots:
        lines += ["### Plots", ""] + [f"![{p.stem}]({assets.name}/{p.name})" for p in plots] + [""]
    where = f" (folders relative to the workdir `{results['workdir']}`)" if results.get("workdir") else ""
    lines += [f"### Runs{where}", "", "| model | " + ("world | " if worlds else "") + "seed | steps | train s | eval s | run folder |",
              "|---|" + ("---|" if worlds else "") + "---|---|---|---|---|"]
    for r in results["runs"]:
        wcell = f"{r.get('world')} | " if worlds else ""
        lines.append(f"| `{r['model']}` | {wcell}{r['seed']} | {r['steps']} | {r['train_seconds'] or 0:.0f} | "
                     f"{r['wall_eval']:.0f} | `{r['run']}` |")
    lines += ["", "Modes: `names` / `descriptions` (DCLIP) / `waffle` carry the class name; `descriptors` scores the "
              "global embedding against the raw descriptions; `regions-<scorer>@α` = α·global + (1−α)·region score "
              "(`bind`: all of a class's descriptions on one object; `max`: each anywhere; `paper`: mean over queries "
              "of the max over descriptions). `regions-*@1` equals the global mode. docs/evaluate.md has the definitions.", ""]
    return lines


def _probe_lines(results: dict[str, Any]) -> list[str]:
    """Per decoder model: the grounding probe on held-out images (mean ± spread over its runs)."""
    by: dict[str, dict[str, dict[RunKey, float]]] = {}
    for r in results["runs"]:
        for key, value in (r.get("probe") or {}).items():
            if key != "descriptions":
                by.setdefault(r["model"], {}).setdefault(key, {})[(r.get("world"), r["seed"])] = value
        if r.get("probe"):
            by[r["model"]].setdefault("gap", {})[(r.get("world"), r["seed"])] = (
                r["probe"]["best_query_giou"] - r["probe"]["static_giou"])
    if not by:
        return []
    lines = [f"### Grounding probe (held-out `distractor` images of each world, {PROBE_IMAGES} drawn, grain.train.probe)", "",
             "Best-query GIoU: for each description, the best GIoU among the image's boxes; static: the same against "
             "the boxes predicted for *another* image (what boxes that ignore the image get); text-query GIoU: the box "
             "of the query whose embedding is closest to the description's text. GIoU in [−1, 1], mean ± spread.", "",
             "| model | best-query GIoU | static GIoU | best − static | text-query GIoU |", "|---|---|---|---|---|"]

    def g(values: dict[RunKey, float]) -> str:
        m, sd = mean_std(values)
        return f"{m:.3f} ± {sd:.3f}" if len(values) > 1 else f"{m:.3f}"

    for name, probes in by.items():
        lines.append(f"| `{name}` | {g(probes['best_query_giou'])} | {g(probes['static_giou'])} | {g(probes['gap'])} | "
                     f"{g(probes['text_query_giou'])} |")
    return lines + [""]


def _world_lines(world: dict[str, Any]) -> list[str]:
    """The composite world: packages, the held-out split, the stamp filter, backgrounds, vocabulary overlap."""
    sig = world["signature"]
    cfg = sig["config"]
    stamps = world["stamps"]
    vocab = world.get("vocabulary") or {}
    lines = ["### The world", "",
             f"- built by `{sig['builder']}` from Debian packages "
             + ", ".join(f"`{k}` {v}" for k, v in sig["packages"].items())
             + f" (installed by scripts/setup_composite.sh, never committed); seed {cfg['seed']}, split seed "
             f"{cfg['split_seed']}" + (f", held out by list {cfg['heldout']}" if cfg["heldout"] else
                                       f", held-out fraction {cfg['heldout_fraction']}"),
             f"- stamps: {stamps['usable']} usable; left out by the documented filter (docs/real-photos.md): "
             + ", ".join(f"{k} {v}" for k, v in stamps["rejected"].items()),
             f"- seen categories ({len(world['seen'])}): " + ", ".join(sorted(world["seen"].values())),
             f"- **held-out categories** ({len(world['heldout'])}, never pasted in training): "
             + ", ".join(f"{n} (`{f}`)" for f, n in sorted(world["heldout"].items(), key=lambda x: x[1])),
             f"- backgrounds (mate-backgrounds photos): training {', '.join(world['backgrounds']['train'])}; "
             f"evaluation only {', '.join(world['backgrounds']['eval'])}",
             ]
    if vocab:
        shares = [v["descriptor_words_in_training"] for v in vocab.values()]
        named = sum(v["name_in_training"] for v in vocab.values())
        lines.append(f"- vocabulary: on average {100 * sum(shares) / len(shares):.0f} % of a held-out category's "
                     f"descriptor words occur anywhere in training text (captions and region descriptions); "
                     f"{named} of {len(vocab)} held-out class names do. Per category: "
                     + ", ".join(f"{k} {100 * v['descriptor_words_in_training']:.0f} %" for k, v in sorted(vocab.items())))
    lines.append("- reading these numbers: [real-photos.md](real-photos.md#what-the-benchmark-found-and-why) (why the "
                 "held-out categories sit at chance; `bench/real_photo_diagnosis.py` re-scores these models with a "
                 "max instead of a mean over a category's alternative stamp sentences)")
    return lines + [""]


def _bar_lines(results: dict[str, Any], heads: list[dict[str, Any]], table: Any) -> list[str]:
    bar = results["bar"]
    out = []
    by = {(h["dataset"], h["task"]): h for h in heads}
    checks = [("single", "classification", "single"), ("distractor", "classification", "distractor"),
              ("swap", "swap", "swap")]
    for key, task, label in checks:
        h = next((v for (d, t), v in by.items() if t == task and key in d), None)
        if h is None:
            continue
        need = bar.get(label)
        if need is not None:
            got = mean_std(h["a"])[0]
            out.append(f"- `{results['headline'][0]}` on {label}: {100 * got:.1f} % (bar ≥ {100 * need:.0f} %): "
                       f"{'met' if got >= need else '**not met**'}")
        gap_need = bar.get(f"{label}_gap")
        if gap_need is not None:
            got = mean_std(h["gap"])[0]
            out.append(f"- gap over `{results['headline'][1]}` on {label}: {100 * got:+.1f} points (bar ≥ "
                       f"{100 * gap_need:.0f}): {'met' if got >= gap_need else '**not met**'}")
    return out


def make_plots(results: dict[str, Any], table: Any, assets: Path, prefix: str = "") -> list[Path]:
    """Accuracy by model and mode, the α sweep and accuracy-vs-step curves (PNG, matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    models = list(results["models"])
    sets = sorted({(d, t) for (_, d, t, _) in table if t != "retrieval"}, key=lambda x: (x[1], x[0]))
    # 1. best mode per model and eval set
    if sets:
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(sets) * len(models) / 3), 4))
        width = 0.8 / max(len(models), 1)
        for i, name in enumerate(models):
            means, errs = [], []
            for d, t in sets:
                mode = best_mode(table, name, d, t)
                m, s = mean_std(table.get((name, d, t, mode), {})) if mode else (0.0, 0.0)
                means.append(100 * m)
                errs.append(100 * s)
            ax.bar([j + i * width for j in range(len(sets))], means, width, yerr=errs, label=name, capsize=2)
        ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(sets))])
        ax.set_xticklabels([f"{d}\n({t})" for d, t in sets])
        ax.set_ylabel("best mode, % (mean ± std)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
        ax.set_title("Accuracy by model (each model's best mode)")
        fig.tight_layout()
        paths.append(assets / f"{prefix}accuracy_by_model.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    # 2. α sweep of the headline model, per scorer and eval set
    a = results["headline"][0]
    sweep = {}
    for (m, d, t, mode), v in table.items():
        if m == a and t == "classification" and mode.startswith("regions-") and "@" in mode:
            scorer, alpha = mode[len("regions-"):].split("@")
            sweep.setdefault((d, scorer), []).append((float(alpha), mean_std(v)[0]))
    if sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (d, scorer), pts in sorted(sweep.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=f"{d} / {scorer}")
        ax.set_xlabel("α (weight of the global score)")
        ax.set_ylabel("top-1 %")
        ax.set_title(f"`{a}`: region score + α · global")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(assets / f"{prefix}alpha_sweep.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    # 3. accuracy vs step (train.eval_every), mean over seeds
    curves: dict[tuple[str, str], dict[int, list[float]]] = {}
    for run in results["runs"]:
        for point in run["curves"]:
            for key, value in point.items():
                if key == "step":
                    continue
                curves.setdefault((run["model"], key), {}).setdefault(point["step"], []).append(value)
    if curves:
        keys = sorted({k for _, k in curves})
        wanted = [k for k in keys if k.endswith("/descriptors") or "regions-bind" in k or k.endswith("regions-paper@0")]
        wanted = wanted or keys
        panels = sorted({k.split("/")[1] for k in wanted})
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            for (model, key), pts in sorted(curves.items()):
                if key in wanted and key.split("/")[1] == panel:
                    steps = sorted(pts)
                    ax.plot(steps, [100 * statistics.fmean(pts[s]) for s in steps], marker=".",
                            label=f"{model} {key.split('/')[-1]}")
            ax.set_title(panel)
            ax.set_xlabel("step")
            ax.set_ylabel("held-out %")
            ax.legend(fontsize=6)
        fig.tight_layout()
        paths.append(assets / f"{prefix}accuracy_vs_step.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
