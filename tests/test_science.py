"""`grain bench science --quick`: the science benchmark end to end on tiny data (every model of
configs/bench/science.yaml trains, every mode evaluates, the report, plots and results.json are written, and a
rerun reuses every run by fingerprint), plus the report's arithmetic on hand-made results."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from grain.config import ConfigError
from grain.evaluate.science import headline_rows, load_bench, mean_std, spread

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BENCH = ROOT / "configs" / "bench" / "science.yaml"


def test_quick_benchmark_end_to_end(tmp_path):
    bench = load_bench(BENCH, quick=True)
    models = [m.name for m in bench.models]
    assert {"grain", "clip_desc", "grain-patches", "clip", "no_rd", "no_box", "grain-paper"} <= set(models)
    report = tmp_path / "science.md"
    cmd = [str(BIN / "grain"), "bench", "science", "--quick", "--jobs", "1", "--out", str(report),
           "--set", f"workdir={tmp_path / 'work'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count(": trained (") == len(models)

    results = json.loads((tmp_path / "science" / "results.json").read_text())
    assert sorted(r["model"] for r in results["runs"]) == sorted(models)
    for run in results["runs"]:
        got = {(r["dataset"], r["task"], r["mode"]) for r in run["rows"]}
        decoder = run["model"] in ("grain", "grain-patches", "no_rd", "no_box", "grain-paper")
        assert run["world"] == 11 and not Path(run["run"]).is_absolute()  # folders relative to the workdir
        assert (run["probe"] is not None) == decoder  # the grounding probe on held-out images
        if decoder:
            assert -1 <= run["probe"]["static_giou"] <= 1 and run["probe"]["descriptions"] > 0
        for dataset in ("single", "distractor", "swap"):
            for mode in ("names", "descriptions", "descriptors", "composed", "waffle"):
                assert (dataset, "classification", mode) in got, (run["model"], dataset, mode)
            for scorer in ("bind", "max", "paper"):
                assert ((dataset, "classification", f"regions-{scorer}@0.5") in got) == decoder
                assert (("swap", "swap", f"regions-{scorer}@0") in got) == decoder
        assert ("swap", "swap", "descriptors") in got and ("swap", "swap", "composed") in got
        assert ("heldout", "retrieval", "captions") in got
        assert run["curves"] and {p["step"] for p in run["curves"]} == {3, 6}  # train.eval_every=3 of 6 steps

    text = report.read_text()
    for needle in ("## Headline: `grain` vs `clip_desc`", "### The bar", "single — classification", "### Grounding probe",
                   "swap — swap", "heldout — retrieval", "accuracy_by_model.png", "alpha_sweep.png",
                   "accuracy_vs_step.png", "| `grain-paper` |"):
        assert needle in text, needle
    for png in ("accuracy_by_model.png", "alpha_sweep.png", "accuracy_vs_step.png"):
        assert (tmp_path / "science" / png).stat().st_size > 1000

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert again.returncode == 0 and again.stdout.count(": reused (") == len(models), again.stdout[-2000:]


def test_headline_gap_is_per_seed_and_the_baseline_gets_its_best_mode():
    def rows(values):
        return [{"dataset": "distractor", "task": "classification", "mode": m, "metric": "acc1", "value": v, "n": 10}
                for m, v in values.items()]

    results = {"headline": ["grain", "clip_desc"], "headline_mode": {"classification": "regions-bind@0"},
               "runs": [
                   {"model": "grain", "seed": 0, "rows": rows({"regions-bind@0": 0.8, "regions-paper@0": 0.9})},
                   {"model": "grain", "seed": 1, "rows": rows({"regions-bind@0": 0.6, "regions-paper@0": 0.1})},
                   {"model": "clip_desc", "seed": 0, "rows": rows({"names": 0.1, "descriptors": 0.3})},
                   {"model": "clip_desc", "seed": 1, "rows": rows({"names": 0.2, "descriptors": 0.2})},
               ]}
    (row,) = headline_rows(results)
    assert row["a_mode"] == "regions-bind@0"  # declared, not the best-looking mode
    assert row["b_mode"] == "descriptors"  # the baseline's best mean (0.25 vs 0.15)
    assert list(row["gap"].values()) == pytest.approx([0.5, 0.4]) and row["runs"] == [(None, 0), (None, 1)]
    assert mean_std(row["gap"]) == pytest.approx((0.45, 0.0707106), rel=1e-5)


def test_runs_over_worlds_report_the_mean_over_worlds_with_world_and_seed_spread_apart():
    """A world's value is the mean over its seeds; the headline is the mean over worlds; the world spread is the std
    of the per-world means, the seed spread the root mean square of the within-world stds."""
    values = {(11, 0): 0.9, (11, 1): 0.8, (12, 0): 0.6, (12, 1): 0.6, (13, 0): 0.7}
    sp = spread(values)
    assert sp["per_world"] == pytest.approx({11: 0.85, 12: 0.6, 13: 0.7})
    assert sp["mean"] == pytest.approx((0.85 + 0.6 + 0.7) / 3)  # not the mean of the 5 runs (0.72)
    assert sp["world_std"] == pytest.approx(statistics.stdev([0.85, 0.6, 0.7]))
    assert sp["seed_std"] == pytest.approx(((statistics.variance([0.9, 0.8]) + 0.0) / 2) ** 0.5)
    assert mean_std(values) == pytest.approx((sp["mean"], sp["world_std"]))
    assert mean_std({(None, 0): 0.5, (None, 1): 0.7}) == pytest.approx((0.6, statistics.stdev([0.5, 0.7])))


def test_worlds_are_chosen_by_name_or_seed_and_a_model_may_take_the_first_only(tmp_path):
    bench = load_bench(BENCH)
    assert bench.world_set == "test" and bench.worlds == [11, 12, 13]
    by = {m.name: m for m in bench.models}
    assert by["grain"].worlds == [11, 12, 13] and by["clip"].worlds == [11]
    runs = bench.runs()
    assert ("grain", 12, 1) in runs and ("clip", 12, 0) not in runs
    assert bench.config(by["grain"], 1, world=12).ingest.synthetic.seed == 12
    dev = load_bench(BENCH, worlds="dev")
    assert dev.world_set == "dev" and dev.worlds == [0, 1, 2] and not set(dev.worlds) & set(bench.worlds)
    assert load_bench(BENCH, worlds="5,6").worlds == [5, 6]
    assert load_bench(BENCH, quick=True).worlds == [11]  # --quick: the first world
    with pytest.raises(ConfigError, match="not one of"):
        load_bench(BENCH, worlds="nope")
    plain = tmp_path / "plain.yaml"
    plain.write_text("pipeline: {}\nmodels: {a: {}, b: {}}\n")
    assert load_bench(plain).worlds == [None] and load_bench(plain).runs() == [("a", None, 0), ("b", None, 0)]
    with pytest.raises(ConfigError, match="no worlds section"):
        load_bench(plain, worlds="dev")


def test_quick_real_photo_benchmark_adds_its_section(tmp_path):
    """The composite-world benchmark (configs/bench/real.yaml) builds its world, runs every model through the
    webdataset ingest path and writes its section next to an existing one in the same report."""
    report = tmp_path / "results.md"
    assets = tmp_path / "results"
    assets.mkdir()
    (assets / "results.json").write_text(json.dumps({  # a stored synthetic section, rendered beside the new one
        "quick": True, "headline": ["grain", "clip_desc"], "command": "grain bench science", "commit": "x",
        "date": "d", "wall_seconds": 60, "data_seconds": 1, "jobs": 1,
        "machine": {"cpu": "cpu", "cores": 2, "memory_gib": 1, "torch": "t"},
        "setup": {"train_images": 1, "image_size": 96, "seen_classes": 2, "unseen_classes": 2, "arch": "a",
                  "arch_overrides": {}, "steps": 1, "batch_size": 1, "lr": 1, "warmup_steps": 0, "max_regions": 1,
                  "weights": {}, "datasets": {}, "regions_global": "descriptors", "bind_window": 1, "alphas": [0]},
        "models": {}, "runs": []}))
    cmd = [str(BIN / "grain"), "bench", "science", "--bench", str(ROOT / "configs" / "bench" / "real.yaml"), "--quick",
           "--jobs", "1", "--out", str(report), "--set", f"workdir={tmp_path / 'work'}",
           "--set", f"world.out={tmp_path / 'world'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((assets / "results-real.json").read_text())
    assert {r["model"] for r in results["runs"]} == {"grain", "clip_desc", "clip", "grain-paper"}
    assert results["world"]["heldout"] and (tmp_path / "world" / "world.json").exists()
    for run in results["runs"]:
        got = {(r["dataset"], r["task"]) for r in run["rows"]}
        assert {("seen", "classification"), ("heldout", "classification"), ("retrieval", "retrieval")} <= got
        assert run["datasets"]["heldout"]["classes"] == len(results["world"]["heldout"])
    text = report.read_text()
    assert text.index("## Synthetic binding world") < text.index("## Real photos (composite world)")
    for needle in ("**held-out categories**", "heldout (classification)", "real_accuracy_by_model.png"):
        assert needle in text, needle


def test_quick_paper_recipe_bench_measures_every_switch(tmp_path):
    """bench/paper_recipe.py --quick: every training switch of the paper recipe trains beside grain's default on
    the same data, the evaluation switches are scored on the default model's own runs, and the JSON holds paired
    differences for each (the CPU smoke form of the measurement docs/train.md reports)."""
    out = tmp_path / "paper-recipe.json"
    cmd = [sys.executable, str(ROOT / "bench" / "paper_recipe.py"), "--quick", "--jobs", "1", "--out", str(out),
           "--set", f"workdir={tmp_path / 'work'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    models = {m.name for m in load_bench(ROOT / "configs" / "bench" / "paper-recipe.yaml").models}
    assert {"grain", "rd-rank16", "rd-rank4", "decay-paper", "mask-off", "towers-paper", "all-paper"} <= models
    assert set(report["training"]) == models
    assert set(report["evaluation"]) == {"grain", "templates46", "unnormalised", "paper"}
    for section in ("training", "evaluation"):
        for name, metrics in report[section].items():
            assert metrics, (section, name)
            for m in metrics.values():
                assert m["runs"] == 1 and 0 <= m["mean"] <= 1
                if name == "grain":
                    assert m["diff_mean"] == 0.0
    assert "| rd-rank16 |" in done.stdout and "| templates46 |" in done.stdout
