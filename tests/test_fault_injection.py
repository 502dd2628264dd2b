"""Kill -9 fault injection, per stage and for the whole Prefect flow (issue 16): a short run of the soak.

Every stage's command (`grain ingest` … `grain evaluate`, and `grain run`, the Prefect flow) is SIGKILLed as a
process group — once at a named kill point (a shard's commit window, a checkpoint write, a training log line, the
eval results write) and once at a random moment — rerun on the same workdir, and finished. tests/support/faultkill.py
checks that the result equals an uninterrupted run (Parquet rows by uid, weights byte for byte, eval results, each
training log step once), that no uid is kept twice, that no temp file or second fingerprint folder is left.
bench/soak.py runs the same trials >= 20 times per stage (docs/reliability.md has its table). describe runs against
the real vLLM server; ground runs a tiny OWLv2 built here.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from support import faultkill as fk

GRAIN = Path(sys.executable).parent / "grain"


@pytest.fixture(scope="module")
def base(vllm_server, tmp_path_factory):
    """Every stage run once, uninterrupted, each on the previous one's outputs: the references."""
    from support.tiny_owl import build_tiny_owlv2

    root = tmp_path_factory.mktemp("faults")
    owl = build_tiny_owlv2(root / "owl", seed=0)
    work = root / "base"
    work.mkdir()
    sizes = fk.write_config(work / "grain.yaml", vllm=vllm_server.base_url, served=vllm_server.model_name, owl=owl,
                            images=24, shards=2, steps=8, every=4)
    refs = {}
    for stage in fk.ORDER:
        refs[stage] = fk.reference(fk.scenario(stage, GRAIN, work / "grain.yaml", sizes), work, log=root / "base.log")
    return {"root": root, "work": work, "sizes": sizes, "refs": refs}


@pytest.mark.parametrize("name", ["ingest", "describe", "ground", "train", "evaluate", "flow"])
def test_sigkill_then_rerun_equals_an_uninterrupted_run(base, name, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    if name == "flow":  # the flow's reference is the stages run one by one: they must agree
        ref = base["refs"]["evaluate"][0]
        seconds = sum(base["refs"][s][1] for s in fk.ORDER)
    else:
        ref, seconds = base["refs"][name]
    work = tmp_path / "work"
    before = fk.upstream_of(name)
    fk.prepare(base["work"], work, base["refs"][before][0] if before else {})
    sc = fk.scenario(name, GRAIN, work / "grain.yaml", base["sizes"])
    log = tmp_path / "run.log"
    outcome = fk.trial(sc, work, ref, seconds, kills=2, rng=random.Random(f"{name}-ci"), log=log, aim_first=True)
    assert outcome.ok, f"{outcome.problems}; log tail:\n{log.read_text(errors='replace')[-3000:]}"
    assert outcome.kills, f"no kill landed ({outcome.not_reached}): the trial proved nothing"
    assert outcome.kills[0].startswith("point"), outcome.kills  # the aimed kill always lands: its point is reached


@pytest.mark.parametrize("name", ["ingest", "describe", "ground", "train", "evaluate"])
def test_concurrent_runs_of_a_stage_equal_one_run(base, name, tmp_path, monkeypatch):
    """Issue 26: 4 processes of the stage's command started together on one workdir (the short form of
    bench/concurrency.py): all exit 0, the outputs equal the uninterrupted run's, no temp file or extra folder, and
    the work they report adds up to one run's (each shard committed once, one training, one encoding)."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    ref, _ = base["refs"][name]
    work = tmp_path / "work"
    before = fk.upstream_of(name)
    fk.prepare(base["work"], work, base["refs"][before][0] if before else {})
    sc = fk.scenario(name, GRAIN, work / "grain.yaml", base["sizes"])
    logs = tmp_path / "logs"
    logs.mkdir()
    outcome = fk.concurrent_trial(sc, work, ref, 4, fk.expected_work(name, base["sizes"]), logs)
    shown = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(logs.iterdir()))
    assert outcome.ok, f"{outcome.problems}\n{shown}"


def test_the_science_bench_with_two_jobs_equals_one_job(tmp_path):
    """`grain bench science --quick --jobs 2`: its two jobs share the world's data and the eval splits; every stage
    folder equals a --jobs 1 run's (one torch thread per job in both: results depend on the thread count)."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    snaps = []
    for jobs in (1, 2):
        work = tmp_path / f"jobs{jobs}"
        done = subprocess.run([str(GRAIN), "bench", "science", "--quick", "--jobs", str(jobs), "--threads", "1",
                               "--out", str(work / "science.md"), "--set", f"workdir={work / 'w'}"],
                              capture_output=True, text=True, env=env, timeout=900, cwd=Path(__file__).parents[1])
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        snaps.append(fk.snapshot(work / "w"))
    assert set(snaps[0]["train"]) and len(snaps[0]["train"]) >= 7  # every model trained: the comparison covers them
    assert fk.diff(snaps[0], snaps[1]) is None, fk.diff(snaps[0], snaps[1])
