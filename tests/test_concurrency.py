"""Two runs on one workdir (issue 26, item 1): the locks of grain.locks, in real processes.

The stage-level soak — every stage's command started 4 times at once on one workdir, checked against an
uninterrupted run — is tests/test_fault_injection.py::test_concurrent_runs_of_a_stage_equal_one_run (and
bench/concurrency.py for the long form); here the mechanism itself: shards shared between processes and committed
once, a dead holder's shard taken over, train and evaluate waiting for the folder's writer, one computation per
embedding cache entry, and the holder named in messages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from grain.locks import FileLock, LockBusyError, entry_lock
from grain.shards import is_complete, read_table

GRAIN = Path(sys.executable).parent / "grain"

WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    import pyarrow as pa
    from grain.shards import Shard, run_stage

    out, log, delay, block, workers = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    SCHEMA = pa.schema([pa.field("uid", pa.string(), nullable=False), pa.field("value", pa.int64(), nullable=False)])

    def process(shard, sink):
        with open(log, "a") as fh:  # one short O_APPEND write per shard started: lines never interleave
            fh.write(f"{os.getpid()} {shard.index}\\n")
        if block != "-" and shard.index == 0:  # hold shard 0 until killed
            Path(block + ".started").write_text(str(os.getpid()))
            while True:
                time.sleep(0.05)
        time.sleep(delay)
        for v in range(shard.start, shard.stop):
            sink.write({"uid": f"u{v}", "value": v})
        return {"rows_in": shard.stop - shard.start}

    if __name__ == "__main__":
        shards = [Shard(i, (), i * 10, i * 10 + 10) for i in range(8)]
        result = run_stage("test", out, "fp1", shards, process, SCHEMA, workers=workers)
        print(json.dumps({"run": result.shards_run, "skipped": result.shards_skipped, "complete": result.complete}))
""")


def _worker(tmp_path: Path, out: Path, log: Path, delay: float = 0.3, block: str = "-", workers: int = 1) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    if not script.exists():
        script.write_text(WORKER)
    return subprocess.Popen([sys.executable, str(script), str(out), str(log), str(delay), block, str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _check_folder(out: Path) -> None:
    assert is_complete(out)
    uids = read_table(out).column("uid").to_pylist()
    assert sorted(uids) == sorted(f"u{v}" for v in range(80)) and len(set(uids)) == 80  # each row once
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("workers", [1, 2])
def test_processes_started_together_share_the_shards_and_commit_each_once(tmp_path, workers):
    out, log = tmp_path / "out", tmp_path / "started.log"
    procs = [_worker(tmp_path, out, log, workers=workers) for _ in range(4)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    _check_folder(out)
    started = Counter(int(line.split()[1]) for line in log.read_text().splitlines())
    assert started == Counter(range(8)), started  # every shard processed exactly once, by one process
    ran = [i for r in results for i in r["run"]]
    assert sorted(ran) == list(range(8))  # what the processes report adds up: no shard twice, none missing
    assert all(r["complete"] for r in results)  # every process ends with the complete folder
    assert sum(bool(r["run"]) for r in results) >= 2, results  # the work was shared, not done by one process


def test_a_killed_holder_releases_its_shard_and_a_waiting_process_takes_it_over(tmp_path):
    out, log, block = tmp_path / "out", tmp_path / "started.log", tmp_path / "block"
    holder = _worker(tmp_path, out, log, delay=0.0, block=str(block))
    deadline = time.time() + 60
    while not Path(str(block) + ".started").exists():
        assert time.time() < deadline and holder.poll() is None, holder.stderr.read() if holder.poll() is not None else "timeout"
        time.sleep(0.05)
    lock = FileLock(out / "_locks" / "part-00000.lock", "shard 0")
    assert not lock.acquire(wait=False)  # held...
    assert f"pid {holder.pid} " in lock.holder()  # ...by the process that says so in the lock file
    other = _worker(tmp_path, out, log, delay=0.0)
    time.sleep(3)
    assert other.poll() is None  # the other process did shards 1-7, and now waits for shard 0
    assert not is_complete(out)
    os.killpg(holder.pid, signal.SIGKILL)  # no cleanup of any kind: the kernel drops the flock
    holder.wait()
    stdout, stderr = other.communicate(timeout=60)
    assert other.returncode == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert 0 in result["run"] and result["complete"]  # taken over...
    _check_folder(out)  # ...and committed once, with no trace of the dead writer's temp files
    assert "is being written by pid" in stderr and str(holder.pid) in stderr  # the wait was announced, naming whom


def test_a_lock_is_released_when_its_holder_is_killed(tmp_path):
    path = tmp_path / "_locks" / "x.lock"
    code = ("import sys, time; from grain.locks import FileLock; l = FileLock(sys.argv[1], 'x'); l.acquire(); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    lock = FileLock(path, "x")
    assert not lock.acquire(wait=False)
    with pytest.raises(LockBusyError, match=f"pid {proc.pid} "):
        from grain.locks import exclusive

        with exclusive(tmp_path / "x", "x", wait=False):
            pass
    proc.kill()
    proc.wait()
    assert lock.acquire(wait=False)  # nothing stale to clean up
    lock.release()


def test_one_process_computes_a_missing_embedding_cache_entry_and_the_others_read_it(tmp_path):
    from grain.evaluate.zeroshot import EmbeddingCache

    cache = EmbeddingCache(tmp_path / "cache", "model")
    calls = []

    def compute():
        calls.append(threading.get_ident())
        time.sleep(0.5)
        return {"image": torch.arange(6, dtype=torch.float32).reshape(2, 3)}

    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get_or_compute("ds", compute))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1  # a flock taken through another descriptor conflicts even within one process
    assert sorted(hit for _, hit in got) == [False, True, True]
    assert all(torch.equal(emb["image"], got[0][0]["image"]) for emb, _ in got)


# ------------------------------------------------------------------------------------------------ train, evaluate

CONFIG = """\
workdir: .
baselines: []
ingest:
  num_shards: 2
  synthetic: {num_images: 32}
train:
  mode: clip
  rewrite_prob: 0.0
  steps: 16
  batch_size: 8
  warmup_steps: 2
  checkpoint_every: 8
  log_every: 4
evaluate:
  datasets:
    - {name: single, kind: synthetic, split: single, num_images: 16}
"""


def _waiting_cli(args: list[str], cwd: Path, err: Path) -> subprocess.Popen:
    """Start ``grain ARGS`` (stderr to ``err``) and return once it says it waits for this test process's lock."""
    proc = subprocess.Popen([str(GRAIN), *args, "--config", "grain.yaml", "--no-progress"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=open(err, "w"), text=True,  # noqa: SIM115
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while f"is being written by pid {os.getpid()} " not in err.read_text():
        assert proc.poll() is None and time.time() < deadline, (proc.communicate(), err.read_text())
        time.sleep(0.05)
    return proc


def test_a_second_train_and_evaluate_wait_for_the_folders_writer_and_reuse_its_output(tmp_path, monkeypatch):
    """This test process plays the first writer: it holds the folder's lock and trains (evaluates) in-process while
    the command waits; the command then finds the finished folder and reuses it instead of working again."""
    from grain.config import load_config
    from grain.evaluate.run import evaluate
    from grain.stages import TRAIN, plan

    (tmp_path / "grain.yaml").write_text(CONFIG)
    subprocess.run([str(GRAIN), "ingest", "--config", "grain.yaml", "--no-progress"], cwd=tmp_path, check=True,
                   capture_output=True)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(tmp_path / "grain.yaml")
    step = plan(cfg, "train")
    with entry_lock(step.out, "train folder"):
        second = _waiting_cli(["train"], tmp_path, tmp_path / "train.err")
        TRAIN._train(cfg, step.inputs, step.out, resume="latest", launcher="local", progress=False)
        assert second.poll() is None  # still waiting while the folder is being written
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, (tmp_path / "train.err").read_text()
    assert "written by another process" in out
    steps = [json.loads(x)["step"] for x in (step.out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12, 16]  # trained once: every step logged once

    again = subprocess.run([str(GRAIN), "train", "--config", "grain.yaml", "--no-progress"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already finished" in again.stdout  # a warm rerun does not redo it either
    assert (step.out / "metrics.jsonl").read_text().count("\n") == 4

    estep = plan(cfg, "evaluate")
    with entry_lock(estep.out, "evaluate folder"):
        second = _waiting_cli(["evaluate"], tmp_path, tmp_path / "eval.err")
        evaluate(cfg.evaluate, estep.inputs["model"], estep.out, workdir=tmp_path, synthetic=cfg.ingest.synthetic,
                 progress=False)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, (tmp_path / "eval.err").read_text()
    assert "written by another process" in out and "(1 dataset(s) encoded" in out  # the writer's counts
    assert pq.read_table(estep.out / "results.parquet").num_rows > 0


def test_torchrun_rank_0_stops_at_once_naming_the_holder(tmp_path, monkeypatch):
    """Under torchrun the other ranks could not wait as long as a training run takes: rank 0 does not wait."""
    from grain.config import load_config
    from grain.stages import TRAIN

    cfg = load_config(None, [f"workdir={tmp_path}"])
    out = tmp_path / "train" / "run"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with entry_lock(out, "train folder"):
        with pytest.raises(LockBusyError, match=f"pid {os.getpid()} .*wait for it to finish, or stop it"):
            TRAIN.run(cfg, {}, out)
    assert not out.exists()
