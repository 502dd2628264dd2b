"""Does caching region embeddings in float16 change any score? Every trained model of a finished benchmark run,
evaluated twice on its own world's evaluation sets — ``evaluate.cache_dtype`` float32 and float16 — every row
compared.

    python bench/cache_dtype_accuracy.py                                   # the paper-recipe benchmark's 42 models
    python bench/cache_dtype_accuracy.py --results runs/bench-science/report/results.json --bench configs/bench/science.yaml

Prints the largest and the mean absolute difference over every (model, dataset, task, mode) row of top-1 (swap:
truth-over-foil) accuracy, in points, how many rows differ at all, and the largest change of a setting's mean over
its runs (what a benchmark table reports).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default=str(REPO / "configs" / "bench" / "paper-recipe.yaml"))
    ap.add_argument("--results", default=None, help="the run's results.json (default: <workdir>/report/results.json)")
    ap.add_argument("--worlds", default=None, help="the world list the run used (default: the file's default)")
    ap.add_argument("--out", default=None, help="results JSON")
    args = ap.parse_args(argv)

    from grain.evaluate.run import HEADLINE_METRIC, evaluate
    from grain.evaluate.science import load_bench

    bench = load_bench(args.bench, worlds=args.worlds)
    workdir = Path(bench.config(world=bench.worlds[0]).workdir)
    results = json.loads(Path(args.results or workdir / "report" / "results.json").read_text())
    diffs: list[float] = []
    per_setting: dict[tuple, list[float]] = {}  # (model, dataset, task, mode) -> signed differences over its runs
    rows = 0
    for run in results["runs"]:
        spec = next(m for m in bench.models if m.name == run["model"])
        scores = {}
        for dtype in ("float32", "float16"):
            cfg = bench.config(spec, run["seed"], extra=[f"evaluate.cache_dtype={dtype}"], world=run["world"])
            res = evaluate(cfg.evaluate, workdir / run["run"] / "model", workdir / "cache-dtype" / dtype / run["run"],
                           workdir=cfg.workdir, synthetic=cfg.ingest.synthetic, progress=False)
            scores[dtype] = {(r["dataset"], r["task"], r["mode"]): r["value"] for r in res.rows
                             if r["metric"] == HEADLINE_METRIC.get(r["task"])}
        for key, v32 in scores["float32"].items():
            diffs.append(100 * abs(scores["float16"][key] - v32))
            per_setting.setdefault((run["model"], *key), []).append(100 * (scores["float16"][key] - v32))
            rows += 1
        print(f"{run['model']} world {run['world']} seed {run['seed']}: max |Δ| "
              f"{max(100 * abs(scores['float16'][k] - v) for k, v in scores['float32'].items()):.2f} points", flush=True)
    summary = {"models": len(results["runs"]), "rows": rows, "max_abs_diff_points": max(diffs),
               "mean_abs_diff_points": statistics.fmean(diffs), "rows_that_differ": sum(d > 0 for d in diffs),
               # what a benchmark table reports: each setting's mean over its runs
               "max_abs_diff_of_run_means_points": max(abs(statistics.fmean(v)) for v in per_setting.values()),
               "settings": len(per_setting)}
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
