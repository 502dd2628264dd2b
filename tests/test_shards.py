"""The shard runner: commit, skip, atomicity under SIGKILL, accounting, ranks, workers, conflicts."""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grain.contracts import ContractError
from grain.shards import (
    Shard,
    ShardAccountingError,
    StageConflictError,
    finished_shards,
    is_complete,
    output_parts,
    read_table,
    run_stage,
)

SCHEMA = pa.schema([pa.field("uid", pa.string(), nullable=False), pa.field("value", pa.int64(), nullable=False)])
SHARDS = [Shard(i, (), i * 10, i * 10 + 10) for i in range(4)]


def numbers(shard: Shard, sink, *, calls: list[int] | None = None):
    """Write rows start..stop; multiples of 7 go to quarantine (as 'bad_row')."""
    if calls is not None:
        calls.append(shard.index)
    for v in range(shard.start, shard.stop):
        if v % 7 == 0:
            sink.quarantine(f"u{v}", "bad_row", f"value {v} is a multiple of 7", "test")
        else:
            sink.write({"uid": f"u{v}", "value": v})
    return {"rows_in": shard.stop - shard.start}


def run(out, process=numbers, fp="fp1", **kw):
    return run_stage("test", out, fp, SHARDS, process, SCHEMA, **kw)


def test_commit_layout_and_totals(tmp_path):
    result = run(tmp_path / "out")
    assert result.complete and result.shards_run == [0, 1, 2, 3] and not result.shards_skipped
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-{i:05d}.parquet" for i in range(4)]
    assert (out / "_SUCCESS.json").exists() and (out / "_stage.json").exists()
    assert not list(out.rglob("*.tmp"))
    success = json.loads((out / "_SUCCESS.json").read_text())
    assert success["rows_in"] == 40 and success["rows_out"] + sum(success["quarantined"].values()) == 40
    assert success["quarantined"] == {"bad_row": len([v for v in range(40) if v % 7 == 0])}
    table = read_table(out)
    assert sorted(table.column("value").to_pylist()) == [v for v in range(40) if v % 7]
    quarantine = read_table(out, quarantine=True)
    assert set(quarantine.column("reason").to_pylist()) == {"bad_row"}


def test_rerun_does_no_work_and_deleting_a_marker_redoes_only_that_shard(tmp_path):
    calls: list[int] = []
    process = functools.partial(numbers, calls=calls)
    run(tmp_path / "o", process)
    assert calls == [0, 1, 2, 3]
    calls.clear()
    again = run(tmp_path / "o", process)
    assert calls == [] and not again.did_work and again.complete and again.shards_skipped == [0, 1, 2, 3]
    (tmp_path / "o" / "_done" / "part-00002.json").unlink()
    assert not is_complete(tmp_path / "o")
    redo = run(tmp_path / "o", process)
    assert calls == [2] and redo.shards_run == [2] and redo.complete
    assert is_complete(tmp_path / "o")


def test_a_marker_whose_output_vanished_is_redone(tmp_path):
    run(tmp_path / "o")
    (tmp_path / "o" / "part-00001.parquet").unlink()
    assert finished_shards(tmp_path / "o") == {0, 2, 3}
    assert run(tmp_path / "o").shards_run == [1]


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import pyarrow as pa
    from grain.shards import Shard, run_stage

    SCHEMA = pa.schema([pa.field("uid", pa.string(), nullable=False), pa.field("value", pa.int64(), nullable=False)])

    def process(shard, sink):
        for v in range(shard.start, shard.stop):
            sink.write({"uid": f"u{v}", "value": v})
            if shard.index == int(sys.argv[2]) and v == shard.start + 300:
                os.kill(os.getpid(), signal.SIGKILL)  # a real crash, mid-shard, after a batch hit the disk
        return {"rows_in": shard.stop - shard.start}

    shards = [Shard(i, (), i * 1000, i * 1000 + 1000) for i in range(4)]
    run_stage("crash", sys.argv[1], "fp", shards, process, SCHEMA)
    """
)


def test_sigkill_mid_shard_leaves_no_partial_shard_and_rerun_completes(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), str(out), "2"], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Shards 0 and 1 were committed; shard 2 died after flushing batches to its tmp file.
    assert finished_shards(out) == {0, 1}
    assert not (out / "part-00002.parquet").exists() and not (out / "_done" / "part-00002.json").exists()
    assert (out / "part-00002.parquet.tmp").exists()  # the partial data is there, but never visible as a shard
    assert not (out / "_SUCCESS.json").exists()
    with pytest.raises(FileNotFoundError, match="not a complete stage"):
        output_parts(out)

    before = {p.name: p.stat().st_mtime_ns for p in (out / "_done").glob("*.json")}
    proc = subprocess.run([sys.executable, str(script), str(out), "-1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert is_complete(out)
    uids = read_table(out).column("uid").to_pylist()
    assert len(uids) == len(set(uids)) == 4000  # every row exactly once
    assert not list(out.rglob("*.tmp"))
    after = {p.name: p.stat().st_mtime_ns for p in (out / "_done").glob("*.json")}
    assert {k: after[k] for k in before} == before  # finished shards were not redone
    assert sorted(after) == [f"part-{i:05d}.json" for i in range(4)]


def test_lost_rows_are_not_committed(tmp_path):
    def lossy(shard, sink):
        numbers(shard, sink)
        return {"rows_in": shard.stop - shard.start + 1}  # claims one more input row than it accounted for

    with pytest.raises(ShardAccountingError, match="part-00000.*11 input rows"):
        run(tmp_path / "o", lossy)
    assert finished_shards(tmp_path / "o") == set()
    assert not list((tmp_path / "o").rglob("*.tmp")) and not list((tmp_path / "o").glob("part-*"))


def test_rows_breaking_the_schema_fail_the_shard_with_a_named_column(tmp_path):
    def bad(shard, sink):
        sink.write({"uid": "x", "value": "not a number"})
        return {"rows_in": 1}

    with pytest.raises(ContractError, match="part-00000.*'value'"):
        run(tmp_path / "o", bad)
    assert finished_shards(tmp_path / "o") == set()


def test_unknown_quarantine_reason_is_a_bug(tmp_path):
    def bad(shard, sink):
        sink.quarantine("x", "because", "no reason", "test")

    with pytest.raises(ValueError, match="unknown quarantine reason 'because'"):
        run(tmp_path / "o", bad)


def test_ranks_split_the_shards_and_the_last_one_marks_success(tmp_path):
    r0 = run(tmp_path / "o", rank=0, world_size=2)
    assert r0.shards_run == [0, 2] and not r0.complete and not (tmp_path / "o" / "_SUCCESS.json").exists()
    r1 = run(tmp_path / "o", rank=1, world_size=2)
    assert r1.shards_run == [1, 3] and r1.complete and is_complete(tmp_path / "o")
    with pytest.raises(ValueError, match="rank"):
        run(tmp_path / "o", rank=2, world_size=2)


def test_worker_processes_write_the_same_rows(tmp_path):
    run(tmp_path / "serial")
    result = run(tmp_path / "pool", workers=2)
    assert result.complete and result.shards_run == [0, 1, 2, 3]
    for i in range(4):
        a = pq.read_table(tmp_path / "serial" / f"part-{i:05d}.parquet")
        b = pq.read_table(tmp_path / "pool" / f"part-{i:05d}.parquet")
        assert a.equals(b)


def test_a_folder_never_mixes_fingerprints(tmp_path):
    run(tmp_path / "o", fp="fp1")
    with pytest.raises(StageConflictError, match="fingerprint"):
        run(tmp_path / "o", fp="fp2")


def test_empty_shards_still_commit_both_files(tmp_path):
    def nothing(shard, sink):
        return {"rows_in": 0}

    result = run(tmp_path / "o", nothing)
    assert result.complete and result.totals["rows_out"] == 0
    for i in range(4):
        assert pq.read_table(tmp_path / "o" / f"part-{i:05d}.parquet").schema.equals(SCHEMA)
        assert (tmp_path / "o" / "quarantine" / f"part-{i:05d}.parquet").exists()


def test_redo_predicate_reruns_flagged_shards_with_their_previous_output_readable(tmp_path):
    from grain.shards import StageRun

    def open_run():
        return StageRun("test", tmp_path / "o", "fp", SHARDS, SCHEMA, redo=lambda m: m.get("flaky", 0) > 0)

    run = open_run()
    assert [s.index for s in run.todo] == [0, 1, 2, 3]
    for shard in run.todo:
        sink = run.sink(shard)
        sink.write({"uid": f"first-{shard.index}", "value": shard.index})
        run.commit(sink, {"rows_in": 1, "flaky": int(shard.index == 2)}, 0.0)
    assert run.finish().complete

    run = open_run()
    assert [s.index for s in run.todo] == [2] and run.result.shards_skipped == [0, 1, 3]
    assert not (tmp_path / "o" / "_SUCCESS.json").exists()  # incomplete again until the redo commits
    previous = run.previous(run.todo[0])
    assert previous is not None and previous.column("uid").to_pylist() == ["first-2"]
    assert run.previous(SHARDS[0]) is not None  # committed shards stay readable
    sink = run.sink(run.todo[0])
    sink.write({"uid": "second-2", "value": 2})
    run.commit(sink, {"rows_in": 1, "flaky": 0}, 0.0)
    result = run.finish()
    assert result.complete and result.shards_run == [2]
    assert sorted(read_table(tmp_path / "o").column("uid").to_pylist()) == ["first-0", "first-1", "first-3", "second-2"]
    assert open_run().todo == []
