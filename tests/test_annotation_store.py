"""The annotation store (issue 27): content-addressed describe replies and ground results, shared by workdirs.

The store itself — lookups across segments and processes, concurrent writers, kill -9 in the middle of a write,
a planted corrupt segment found by `grain cache verify` — and the stages with it: describe against the real vLLM
server and ground with a tiny OWLv2 write the same rows with the store off, cold and warm, re-sharded input asks
the engine nothing, and duplicate images are sent once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import STAGE_RAY
from grain.annotate.store import AnnotationStore, content_key, read_segment, resolve_root, verify
from grain.shards import iter_markers, read_table

GRAIN = Path(sys.executable).parent / "grain"
SETTINGS = {"engine": "openai", "model": "m", "prompt_id": "describe@00000000"}


def _value(i: int) -> dict:
    return {"text": f"reply {i} " + "x" * (i % 50), "prompt_tokens": i, "completion_tokens": 3}


def test_values_come_back_by_key_across_segments_instances_and_namespaces(tmp_path):
    store = AnnotationStore(tmp_path, "describe", SETTINGS)
    keys = [content_key("describe", str(i)) for i in range(300)]
    store.put_many({k: _value(i) for i, k in enumerate(keys[:200])})
    store.put_many({k: _value(i + 200) for i, k in enumerate(keys[200:])})
    assert store.get_many(keys[:3] + ["0" * 64]) == {k: _value(i) for i, k in enumerate(keys[:3])}
    fresh = AnnotationStore(tmp_path, "describe", SETTINGS)  # another process: reads the segments from disk
    assert len(fresh) == 300 and fresh.get_many(keys) == {k: _value(i) for i, k in enumerate(keys)}
    other = AnnotationStore(tmp_path, "describe", {**SETTINGS, "model": "m2"})  # other settings: nothing shared
    assert other.get_many(keys) == {}
    assert len(list((tmp_path / "describe").iterdir())) == 1  # the other namespace wrote nothing
    # two keys sharing the index's 64-bit prefix: the full key decides
    a, b = "ab" * 8 + "0" * 48, "ab" * 8 + "1" * 48
    store.put_many({a: {"text": "A"}})
    assert store.get_many([a, b]) == {a: {"text": "A"}}
    assert content_key("ab", "c") != content_key("a", "bc")


def test_the_setting_resolves_to_a_folder_or_off(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAIN_ANNOTATION_CACHE", str(tmp_path / "s"))
    assert resolve_root("auto") == tmp_path / "s" and resolve_root("off") is None
    assert resolve_root(str(tmp_path / "x")) == tmp_path / "x"
    monkeypatch.setenv("GRAIN_ANNOTATION_CACHE", "off")
    assert resolve_root("auto") is None
    monkeypatch.delenv("GRAIN_ANNOTATION_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_root("auto") == tmp_path / "xdg" / "grain" / "annotations"


WRITER = textwrap.dedent("""
    import sys
    from grain.annotate.store import AnnotationStore, content_key
    root, name, n, per = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store = AnnotationStore(root, "describe", {"engine": "openai", "model": "m", "prompt_id": "describe@00000000"})
    i = 0
    while n < 0 or i < n:
        store.put_many({content_key(name, str(i * per + j)): {"text": f"{name} {i * per + j}"} for j in range(per)})
        i += 1
""")


def test_concurrent_writers_lose_nothing(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "store"), f"w{p}", "5", "100"])
             for p in range(4)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    store = AnnotationStore(tmp_path / "store", "describe", SETTINGS)
    keys = {content_key(f"w{p}", str(i)): {"text": f"w{p} {i}"} for p in range(4) for i in range(500)}
    assert len(store) == 2000 and store.get_many(keys) == keys
    assert verify(tmp_path / "store") == (20, [])


def test_kill_9_during_writes_never_leaves_a_segment_that_reads_as_valid_but_is_not(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(0)
    root = tmp_path / "store"
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(root), f"k{trial}", "-1", "5000"],
                                start_new_session=True)
        time.sleep(1.5 + rng.random() * 2.0)  # past the imports, into the loop of big segment writes
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    checked, problems = verify(root)
    assert checked >= 1 and problems == [], problems  # every segment that exists is whole
    store = AnnotationStore(root, "describe", SETTINGS)
    for seg in sorted((root / "describe").glob("*/seg-*.parquet")):  # and every key in it reads back
        keys = pq.read_table(seg, columns=["key"]).column("key").to_pylist()
        assert len(store.get_many(keys)) == len(keys)
    leftovers = list((root / "describe").glob("*/.*.tmp"))  # a killed writer's temp files: never read...
    done = subprocess.run([str(GRAIN), "cache", "prune", "--root", str(root)], capture_output=True, text=True)
    assert done.returncode == 0 and f"and {len(leftovers)} temp file(s)" in done.stdout, done.stdout + done.stderr
    assert not list((root / "describe").glob("*/.*.tmp"))  # ...and pruned


def test_grain_cache_verify_finds_a_planted_corrupt_segment_and_lookups_skip_it(tmp_path):
    root = tmp_path / "store"
    store = AnnotationStore(root, "describe", SETTINGS)
    keys = [content_key("c", str(i)) for i in range(2000)]
    good = store.put_many({k: _value(i) for i, k in enumerate(keys[:1000])})
    bad = store.put_many({k: _value(i) for i, k in enumerate(keys[1000:], 1000)})
    ok = subprocess.run([str(GRAIN), "cache", "verify", "--root", str(root)], capture_output=True, text=True)
    assert ok.returncode == 0 and "2 segment(s) checked, 0 problem(s)" in ok.stdout, ok.stdout + ok.stderr

    data = bytearray(bad.read_bytes())
    middle = len(data) // 3
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])  # bit rot inside a data page
    bad.write_bytes(bytes(data))
    done = subprocess.run([str(GRAIN), "cache", "verify", "--root", str(root)], capture_output=True, text=True)
    assert done.returncode == 1 and f"bad: {bad}" in done.stderr and "1 problem(s)" in done.stdout, done.stdout + done.stderr
    fresh = AnnotationStore(root, "describe", SETTINGS)
    got = fresh.get_many(keys)
    truth = {k: _value(i) for i, k in enumerate(keys)}
    assert all(got[k] == truth[k] for k in got)  # nothing damaged is ever returned...
    assert set(keys[:1000]) <= set(got) and len(got) < 2000  # ...the keys in damaged pages are misses (computed again)

    truncated = AnnotationStore(root, "describe", SETTINGS).put_many({content_key("t", "0"): {"text": "t"}})
    truncated.write_bytes(truncated.read_bytes()[:-20])  # a torn file: its footer is gone
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        read_segment(truncated)
    assert AnnotationStore(root, "describe", SETTINGS).get_many([content_key("t", "0")]) == {}
    assert good.exists()


def test_stats_and_prune_by_model_and_age(tmp_path):
    root = tmp_path / "store"
    AnnotationStore(root, "describe", SETTINGS).put_many({content_key("a", "1"): {"text": "a"}})
    AnnotationStore(root, "describe", {**SETTINGS, "model": "old"}).put_many({content_key("a", "1"): {"text": "b"}})
    AnnotationStore(root, "ground", {"engine": "owlv2", "model": "owl"}).put_many({content_key("g", "1"): {"regions": []}})
    out = subprocess.run([str(GRAIN), "cache", "stats", "--root", str(root)], capture_output=True, text=True).stdout
    assert "3 namespace(s), 3 key(s)" in out and "model=old" in out and "ground" in out
    out = subprocess.run([str(GRAIN), "cache", "prune", "--root", str(root), "--model", "old"], capture_output=True, text=True).stdout
    assert "removed 1 segment(s) (1 key(s)" in out
    assert AnnotationStore(root, "describe", {**SETTINGS, "model": "old"}).get_many([content_key("a", "1")]) == {}
    assert AnnotationStore(root, "describe", SETTINGS).get_many([content_key("a", "1")]) == {content_key("a", "1"): {"text": "a"}}
    out = subprocess.run([str(GRAIN), "cache", "prune", "--root", str(root), "--older-than-days", "0"], capture_output=True, text=True).stdout
    assert "removed 2 segment(s)" in out


# ------------------------------------------------------------------------------------------------ the stages

def _rows(folder: Path) -> list[dict]:
    return sorted(read_table(folder).to_pylist(), key=lambda r: r["uid"])


def _count(folder: Path, key: str) -> int:
    return sum(int(m.get(key, 0)) for m in iter_markers(folder))


def _describe_cfg(server):
    from grain.config import DescribeConfig

    return DescribeConfig(engine="openai", model=server.served_model_name, max_tokens=16,
                          openai={"base_url": server.base_url, "concurrency": 4, "timeout_s": 60, "max_retries": 1})


def _server_requests(server) -> float:
    """The vLLM server's own count of finished requests (its Prometheus endpoint)."""
    import urllib.request

    text = urllib.request.urlopen(f"{server.root_url}/metrics", timeout=30).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


@pytest.mark.usefixtures("local_ray")
def test_describe_writes_the_same_rows_with_the_store_off_cold_and_warm_and_resharded_input_asks_nothing(
        vllm_server, tmp_path):
    from grain.annotate.describe import describe
    from grain.config import IngestConfig, SyntheticConfig
    from grain.data.ingest import ingest

    syn = SyntheticConfig(num_images=12)
    ingest(IngestConfig(num_shards=3, synthetic=syn), tmp_path / "samples")
    cfg, store = _describe_cfg(vllm_server), tmp_path / "store"
    before = _server_requests(vllm_server)
    off = describe(cfg, tmp_path / "samples", tmp_path / "off", ray_cfg=STAGE_RAY)
    off_requests = _server_requests(vllm_server) - before
    assert off_requests == 24 and off.complete  # 12 images x (description + caption rewrite)

    before = _server_requests(vllm_server)
    describe(cfg, tmp_path / "samples", tmp_path / "cold", store_root=store, ray_cfg=STAGE_RAY)
    assert _server_requests(vllm_server) - before == 24 and _count(tmp_path / "cold", "requests") == 24
    before = _server_requests(vllm_server)
    describe(cfg, tmp_path / "samples", tmp_path / "warm", store_root=store, ray_cfg=STAGE_RAY)
    assert _server_requests(vllm_server) - before == 0  # the server saw nothing...
    assert _count(tmp_path / "warm", "requests") == 0 and _count(tmp_path / "warm", "store_hits") == 24
    assert _rows(tmp_path / "off") == _rows(tmp_path / "cold") == _rows(tmp_path / "warm")  # ...and the rows are the same
    stats = subprocess.run([str(GRAIN), "stats", str(tmp_path / "warm")], capture_output=True, text=True)
    assert "prompts answered by the annotation store 24, by an identical request of the same run 0" in stats.stdout, stats.stdout

    ingest(IngestConfig(num_shards=5, synthetic=syn), tmp_path / "resharded")  # another folder, the same images
    before = _server_requests(vllm_server)
    describe(cfg, tmp_path / "resharded", tmp_path / "resharded-d", store_root=store, ray_cfg=STAGE_RAY)
    assert _server_requests(vllm_server) - before == 0
    assert _rows(tmp_path / "resharded-d") == _rows(tmp_path / "off")


@pytest.mark.usefixtures("local_ray")
def test_exact_duplicate_images_are_described_once(vllm_server, tmp_path):
    """Half the rows repeat an image (and caption) of the other half under another uid: the server gets one request
    per distinct image and prompt, and the duplicates' rows equal their originals'."""
    from grain.annotate.describe import describe
    from grain.config import IngestConfig, SyntheticConfig
    from grain.contracts import SAMPLES_SCHEMA
    from grain.data.ingest import ingest

    ingest(IngestConfig(num_shards=2, synthetic=SyntheticConfig(num_images=6)), tmp_path / "orig")
    rows = read_table(tmp_path / "orig").to_pylist()
    dup = tmp_path / "dups"
    dup.mkdir()
    copies = [{**r, "uid": r["uid"] + "-copy"} for r in rows]
    # the same rows again under other uids, in another shard (the shard runner's layout, written by hand)
    for i, part in enumerate((rows, copies)):
        pq.write_table(pa.Table.from_pylist(part, schema=SAMPLES_SCHEMA), dup / f"part-{i:05d}.parquet")
    _fake_complete_stage(dup, tmp_path / "orig", 2)
    before = _server_requests(vllm_server)
    describe(_describe_cfg(vllm_server), dup, tmp_path / "d", store_root=tmp_path / "store", ray_cfg=STAGE_RAY)
    assert _server_requests(vllm_server) - before == 12  # 6 distinct images x 2 prompts, not 24
    assert _count(tmp_path / "d", "deduplicated") == 12
    out = {r["uid"]: r for r in read_table(tmp_path / "d").to_pylist()}
    for r in rows:
        assert {**out[r["uid"] + "-copy"], "uid": r["uid"]} == out[r["uid"]]


def _fake_complete_stage(folder: Path, like: Path, shards: int) -> None:
    """Markers and headers for hand-written samples shards (so that describe accepts the folder as finished)."""
    from grain.shards import write_json_atomic

    header = json.loads((like / "_stage.json").read_text())
    write_json_atomic(folder / "_stage.json", {**header, "fingerprint": "dups", "num_shards": shards})
    (folder / "quarantine").mkdir()
    for i in range(shards):
        part = folder / f"part-{i:05d}.parquet"
        n = pq.read_metadata(part).num_rows
        pq.write_table(pa.table({}), folder / "quarantine" / part.name)
        write_json_atomic(folder / "_done" / f"part-{i:05d}.json", {
            "shard": part.stem, "index": i, "inputs": [], "rows_in": n, "rows_out": n, "quarantined": {}, "bytes": 0,
            "seconds": 0})
    write_json_atomic(folder / "_SUCCESS.json", {"stage": "ingest", "num_shards": shards})


@pytest.mark.usefixtures("local_ray")
def test_ground_writes_the_same_rows_with_the_store_off_cold_and_warm(tmp_path):
    from support.tiny_owl import build_tiny_owlv2

    from grain.annotate.describe import describe
    from grain.annotate.ground import ground
    from grain.config import DescribeConfig, GroundConfig, IngestConfig, SyntheticConfig
    from grain.data.ingest import ingest

    ingest(IngestConfig(num_shards=2, synthetic=SyntheticConfig(num_images=8)), tmp_path / "s")
    describe(DescribeConfig(engine="reference"), tmp_path / "s", tmp_path / "d")
    owl = build_tiny_owlv2(tmp_path / "owl", seed=0)
    cfg = GroundConfig(engine="owlv2", model=str(owl), threshold=0.0, batch_size=4)
    ray = STAGE_RAY.model_copy(update={"batch_size": 4})
    ground(cfg, tmp_path / "s", tmp_path / "d", tmp_path / "off", ray_cfg=ray)
    ground(cfg, tmp_path / "s", tmp_path / "d", tmp_path / "cold", ray_cfg=ray, store_root=tmp_path / "store")
    ground(cfg, tmp_path / "s", tmp_path / "d", tmp_path / "warm", ray_cfg=ray, store_root=tmp_path / "store")
    assert _count(tmp_path / "cold", "detector_calls") == 8 and _count(tmp_path / "warm", "detector_calls") == 0
    assert _count(tmp_path / "warm", "store_hits") == 8
    assert _rows(tmp_path / "off") == _rows(tmp_path / "cold") == _rows(tmp_path / "warm")
