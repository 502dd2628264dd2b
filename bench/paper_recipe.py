"""What each of the authors' choices does: the `paper` recipe's switches one at a time, on the development worlds.

    python bench/paper_recipe.py                 # configs/bench/paper-recipe.yaml, dev worlds 0-2, seeds 0-1 (~35 min, 2 cores)
    python bench/paper_recipe.py --quick         # the CI smoke form: tiny data, a few steps, one world and seed

Training switches (each a model of the bench file, everything else grain's default, same data, towers, steps, batch):
L_rd negatives per rank instead of global (16 and 4 simulated ranks: ``train.rd_negatives: rank`` with
``train.rd_rank_images`` 2 and 8 of a 32-image batch) and the authors' weight-decay groups. Evaluation switches,
scored on the default model's own runs (no retraining; image embeddings come from the evaluation cache): the
authors' 46-template ensemble (``evaluate.template_set: paper46`` + ``description_templates: all``) and their
un-normalised class mean (``evaluate.renormalize: false``), alone and together, with the global score from the DCLIP
sentences (``regions_global: descriptions``, as the authors score).

Every number is paired: the same (world, seed) run with and without the switch; the table gives each setting's mean
± the spread over worlds, and the mean paired difference to grain's default ± its std over the runs. The results go
to ``--out`` (JSON; docs/results/paper-recipe.json) and the Markdown tables are printed (docs/train.md has them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_FILE = REPO / "configs" / "bench" / "paper-recipe.yaml"

#: (dataset, task, mode) of the training-switch table: region scoring as the headline declares it, and the global
#: embedding with the raw descriptors (no region query).
TRAIN_METRICS = (("single", "classification", "regions-bind@0"), ("distractor", "classification", "regions-bind@0"),
                 ("swap", "swap", "regions-bind@0"), ("single", "classification", "descriptors"),
                 ("distractor", "classification", "descriptors"))
#: evaluation settings scored on the default model (evaluate overrides; all with the global score from DCLIP sentences)
EVAL_BASE = ["evaluate.modes=[names, descriptions, regions]", "evaluate.regions_global=descriptions",
             "evaluate.region_scorers=[bind, paper]", "evaluate.alphas=[0.0, 0.5, 1.0]"]
EVAL_VARIANTS = {
    "grain": [],
    "templates46": ["evaluate.template_set=paper46", "evaluate.description_templates=all"],
    "unnormalised": ["evaluate.renormalize=false"],
    "paper": ["evaluate.template_set=paper46", "evaluate.description_templates=all", "evaluate.renormalize=false"],
}
EVAL_METRICS = (("single", "classification", "names"), ("single", "classification", "descriptions"),
                ("distractor", "classification", "descriptions"), ("single", "classification", "regions-paper@0.5"),
                ("distractor", "classification", "regions-paper@0.5"), ("single", "classification", "regions-bind@0.5"),
                ("distractor", "classification", "regions-bind@0.5"))
BASELINE = "grain"


def _value(rows: list[dict[str, Any]], dataset: str, task: str, mode: str) -> float | None:
    from grain.evaluate.science import HEADLINE_METRIC

    for r in rows:
        if (r["dataset"], r["task"], r["mode"], r["metric"]) == (dataset, task, mode, HEADLINE_METRIC[task]):
            return float(r["value"])
    return None


def _summary(values: dict[tuple[Any, int], float], base: dict[tuple[Any, int], float]) -> dict[str, Any]:
    """Mean ± world spread of ``values``, and the paired difference to ``base`` over the runs both have."""
    from grain.evaluate.science import spread

    sp = spread(values)
    shared = sorted(set(values) & set(base), key=lambda k: (str(k[0]), k[1]))
    diffs = [values[k] - base[k] for k in shared]
    return {"mean": sp["mean"], "world_std": sp["world_std"], "seed_std": sp["seed_std"], "runs": len(values),
            "diff_mean": statistics.fmean(diffs) if diffs else float("nan"),
            "diff_std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "per_run": {f"{w}/{s}": v for (w, s), v in sorted(values.items(), key=lambda kv: (str(kv[0][0]), kv[0][1]))}}


def _table(title: str, section: dict[str, dict[str, Any]], metrics: tuple[tuple[str, str, str], ...]) -> str:
    head = " | ".join(f"{d} {m}" if t != "swap" else "swap test " + m for d, t, m in metrics)
    lines = [f"**{title}** (top-1 % / swap %, mean ± std over worlds; Δ = paired difference to `{BASELINE}` ± its std)",
             "", f"| setting | {head} |", "|---|" + "---|" * len(metrics)]
    for name, per in section.items():
        cells = []
        for d, t, m in metrics:
            s = per.get(f"{d}/{t}/{m}")
            if s is None:
                cells.append("—")
            elif name == BASELINE:
                cells.append(f"{100 * s['mean']:.1f} ± {100 * s['world_std']:.1f}")
            else:
                cells.append(f"{100 * s['mean']:.1f} (Δ {100 * s['diff_mean']:+.1f} ± {100 * s['diff_std']:.1f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default=str(BENCH_FILE), help="the bench file (default: configs/bench/paper-recipe.yaml)")
    ap.add_argument("--quick", action="store_true", help="the CI smoke form (the file's quick section)")
    ap.add_argument("--worlds", default=None, help="a world list of the file, or comma-separated seeds (default: the file's first list, dev)")
    ap.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the file's jobs)")
    ap.add_argument("--out", default=None, help="results JSON (default: <workdir>/paper-recipe.json)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override (repeatable)")
    args = ap.parse_args(argv)

    from grain.evaluate.run import evaluate, read_results
    from grain.evaluate.science import load_bench, run_bench

    t0 = time.perf_counter()
    bench = load_bench(args.bench, args.quick, args.overrides, args.worlds)
    workdir = Path(bench.config(world=bench.worlds[0]).workdir)
    results = run_bench(bench, workdir / "report.md", jobs=args.jobs, progress=True,
                        command="python bench/paper_recipe.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    t_train = time.perf_counter() - t0

    training: dict[str, dict[str, dict[tuple[Any, int], float]]] = {}
    for run in results["runs"]:
        for d, t, m in TRAIN_METRICS:
            v = _value(run["rows"], d, t, m)
            if v is not None:
                training.setdefault(run["model"], {}).setdefault(f"{d}/{t}/{m}", {})[(run["world"], run["seed"])] = v

    evaluation: dict[str, dict[str, dict[tuple[Any, int], float]]] = {}
    spec = next(m for m in bench.models if m.name == BASELINE)
    for run in (r for r in results["runs"] if r["model"] == BASELINE):
        model_dir = workdir / run["run"] / "model"
        for name, extra in EVAL_VARIANTS.items():
            cfg = bench.config(spec, run["seed"], extra=[*EVAL_BASE, *extra], world=run["world"])
            out = workdir / "eval-variants" / name / f"w{run['world']}-s{run['seed']}"
            evaluate(cfg.evaluate, model_dir, out, workdir=cfg.workdir, synthetic=cfg.ingest.synthetic, progress=False)
            rows = read_results(out)
            for d, t, m in EVAL_METRICS:
                v = _value(rows, d, t, m)
                if v is not None:
                    evaluation.setdefault(name, {}).setdefault(f"{d}/{t}/{m}", {})[(run["world"], run["seed"])] = v

    def summarise(section: dict[str, dict[str, dict[tuple[Any, int], float]]]) -> dict[str, dict[str, Any]]:
        base = section.get(BASELINE, {})
        return {name: {k: _summary(v, base.get(k, {})) for k, v in per.items()} for name, per in section.items()}

    report = {"bench": str(Path(args.bench).resolve().relative_to(REPO)) if Path(args.bench).resolve().is_relative_to(REPO) else args.bench,
              "quick": args.quick, "worlds": bench.worlds, "seeds": sorted({s for m in bench.models for s in m.seeds}),
              "steps": bench.config(world=bench.worlds[0]).train.steps, "machine": results["machine"],
              "commit": results["commit"], "date": results["date"], "wall_seconds": time.perf_counter() - t0,
              "train_wall_seconds": t_train, "models": {m.name: m.overrides for m in bench.models},
              "eval_variants": EVAL_VARIANTS, "eval_base": EVAL_BASE,
              "training": summarise(training), "evaluation": summarise(evaluation)}
    out_path = Path(args.out) if args.out else workdir / "paper-recipe.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1, default=str))
    print()
    print(_table("Training switches", report["training"], TRAIN_METRICS))
    print()
    print(_table("Evaluation switches (on the default model)", report["evaluation"], EVAL_METRICS))
    print(f"\n{len(results['runs'])} training runs, {report['wall_seconds'] / 60:.1f} min; results: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
