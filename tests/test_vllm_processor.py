"""The ``vllm`` engine's row handling (issue 22, "Silent loss"): through the real describe stage and describe-classes.

The only fake is tests/support/fault_llm_stage.py, a FAULT INJECTOR that stands in for the stages of the
``ray.data.llm`` processor (no GPU or vLLM here). It answers most rows with a numbered list, and for chosen rows
returns what Ray's vLLM stage returns for a failed row under ``should_continue_on_error=True`` (a non-empty
``__inference_error__``, empty outputs). Everything else is real: Ray's ``Processor`` with its pre/postprocess
wrappers and stage machinery, grain's preprocess, postprocess and normalisation, Ray Data, the shard commits.

Checked: every uid ends with a row, described or with an ``error`` naming the cause (the engine's error, or an
image that cannot be prepared, which never reaches the engine); both count as retryable errors; a rerun with a
healthy engine sends exactly the failed rows and reuses the rest. Before the fix, the engine's failed rows were
written as "no usable description" with no error (never retried) and the unpreparable image failed the whole job.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest

import grain.annotate.classes as classes
import grain.annotate.engines as engines
from grain.annotate.describe import describe
from grain.config import DescribeConfig
from grain.contracts import SAMPLES_SCHEMA
from grain.shards import Shard, iter_markers, read_table, run_stage
from support import fault_llm_stage as fault
from support.fault_llm_stage import fault_llm_stage, seen_rows

from conftest import STAGE_RAY, encode, gradient_image

RAY = STAGE_RAY
pytestmark = pytest.mark.usefixtures("local_ray")  # one Ray for the module (conftest)

REPLY = "1. a round red body\n2. two thin black legs\n3. a striped tail"
PARSED = ["a round red body", "two thin black legs", "a striped tail"]
INJECTED = "injected fault: CUDA error on this row"
BROKEN = "u1"  # its image cannot be prepared: the engine must never see it
FAILING = {"u2", "u5"}  # the fault injector fails their requests on the first run


@pytest.fixture(autouse=True)
def _workers_can_load_the_injector():
    """Ray workers cannot import tests/support: the injector's classes travel by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(fault)


@pytest.fixture
def samples_with_a_broken_image(tmp_path):
    """Two samples shards of 4 rows (u0..u3, u4..u7); u1's image bytes are a broken PNG."""
    good = encode(gradient_image(48, 40), "PNG")

    def process(shard, sink):
        for i in range(4 * shard.index, 4 * shard.index + 4):
            sink.write({"uid": f"u{i}", "image": b"\x89PNG\r\n\x1a\n-broken-" if f"u{i}" == BROKEN else good,
                        "width": 48, "height": 40, "caption": "a thing", "source": "t", "meta": "{}", "label": None,
                        "regions": None})
        return {"rows_in": 4}

    run_stage("ingest", tmp_path / "s", "fp", [Shard(0), Shard(1)], process, SAMPLES_SCHEMA)
    return tmp_path / "s"


def inject(monkeypatch, module, builder: str, log, **kw) -> None:
    """Make ``module.builder`` build its processor around the fault injector (the ``stages=`` seam)."""
    real = getattr(module, builder)
    monkeypatch.setattr(module, builder, functools.partial(real, stages=[fault_llm_stage(reply=REPLY, seen_log=str(log), **kw)]))


def test_failed_and_unpreparable_rows_end_as_errors_and_a_rerun_retries_exactly_them(
        samples_with_a_broken_image, tmp_path, monkeypatch):
    cfg = DescribeConfig(engine="vllm", model="fault-injector", max_descriptions=5, vllm={"batch_size": 4})
    kinds = ("describe", "rewrite")
    everyone = {f"u{i}" for i in range(8)}
    out = tmp_path / "d"

    first_log = tmp_path / "seen-first.jsonl"
    inject(monkeypatch, engines, "build_vllm_processor", first_log, fail_column="uid", fail_values=FAILING,
           error=INJECTED, log_columns=["uid", "kind"])
    result = describe(cfg, samples_with_a_broken_image, out, ray_cfg=RAY)
    rows = {r["uid"]: r for r in read_table(out).to_pylist()}
    assert sorted(rows) == sorted(everyone) and result.complete
    for uid in FAILING:
        assert rows[uid]["descriptions"] == [] and INJECTED in (rows[uid]["error"] or ""), rows[uid]
        assert "vllm: RuntimeError" in rows[uid]["error"]
    assert "image cannot be prepared" in (rows[BROKEN]["error"] or "") and rows[BROKEN]["descriptions"] == []
    for uid in everyone - FAILING - {BROKEN}:
        assert rows[uid]["error"] is None and rows[uid]["descriptions"] == PARSED, rows[uid]
        assert rows[uid]["caption_rewrite"] == PARSED[0]
    # the engine saw every request but the unpreparable image's, once each
    assert Counter((r["uid"], r["kind"]) for r in seen_rows(first_log)) == Counter(
        (u, k) for u in everyone - {BROKEN} for k in kinds)
    totals = result.totals
    assert (totals["rows_described"], totals["rows_no_description"]) == (5, 0)
    assert totals["rows_with_errors"] == totals["rows_retryable_errors"] == 3
    markers = list(iter_markers(out))
    assert [(m["errors"], m["retryable_errors"], m["reused_rows"], m["requests"]) for m in markers] == [
        (2, 2, 0, 8), (1, 1, 0, 8)]
    assert markers[0]["tokens_out"] > 0  # token counts come through the postprocess

    rerun_log = tmp_path / "seen-rerun.jsonl"
    inject(monkeypatch, engines, "build_vllm_processor", rerun_log, fail_column="uid", log_columns=["uid", "kind"])
    again = describe(cfg, samples_with_a_broken_image, out, ray_cfg=RAY)
    assert again.shards_run == [0, 1] and again.complete
    # exactly the failed rows went to the engine again; the described ones were reused
    assert Counter((r["uid"], r["kind"]) for r in seen_rows(rerun_log)) == Counter((u, k) for u in FAILING for k in kinds)
    markers = list(iter_markers(out))
    assert [(m["errors"], m["reused_rows"], m["requests"]) for m in markers] == [(1, 2, 4), (0, 3, 2)]
    after = {r["uid"]: r for r in read_table(out).to_pylist()}
    assert sorted(after) == sorted(everyone)
    assert {u for u, r in after.items() if r["error"] is None and r["descriptions"] == PARSED} == everyone - {BROKEN}
    assert "image cannot be prepared" in (after[BROKEN]["error"] or "")
    for uid in everyone - FAILING - {BROKEN}:
        assert after[uid] == rows[uid]  # reused as they were
    assert again.totals["rows_with_errors"] == again.totals["rows_retryable_errors"] == 1


def test_describe_classes_keeps_a_failed_class_with_the_engines_error(tmp_path, monkeypatch):
    log = tmp_path / "seen.jsonl"
    inject(monkeypatch, classes, "build_class_processor", log, fail_column="classname", fail_values={"barn owl"},
           error=INJECTED)
    cfg = DescribeConfig(engine="vllm", model="fault-injector", max_descriptions=5, vllm={"batch_size": 2})
    names = ["golden retriever", "barn owl", "sailboat"]
    result = classes.describe_classes(cfg, names, ray_cfg=RAY)
    assert list(result.descriptors) == names
    assert result.errors == {"barn owl": f"class 'barn owl': vllm: RuntimeError: {INJECTED}"}
    assert result.descriptors == {"golden retriever": PARSED, "barn owl": [], "sailboat": PARSED}
    assert sorted(r["classname"] for r in seen_rows(log)) == sorted(names)
