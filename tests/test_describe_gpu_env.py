"""The GPU describe venv installs: constraints-describe-gpu.txt is what pip resolves for a GPU machine.

The GPU describe path (offline vLLM in Ray Data) has its own venv (scripts/setup_describe_gpu.sh), because Ray pins
its vLLM and vLLM pins its torch (docs/describe.md). The first two tests are offline: the pins agree with each
other (the pyproject extra, constraints.txt and the lock name the same Ray, and Ray's own metadata asks for the
lock's vLLM), and the comparison names every disagreement. The other two ask PyPI (CI reaches it; an unreachable
PyPI fails them, it does not skip them) to resolve grain + its ``vllm`` extra for CPython 3.11 on manylinux x86_64 the way a
GPU user's pip would (scripts/describe_gpu_lock.py): with the lock as constraints pip must pick exactly the lock,
and a lock with the training torch must fail. About 40 s and 15 s here (2 cores). Wheels are not downloaded, only
their metadata (about 110 MB here, where the index serves no metadata files and pip reads them by range requests).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _lock_module():
    spec = importlib.util.spec_from_file_location("describe_gpu_lock", REPO / "scripts" / "describe_gpu_lock.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("describe_gpu_lock", module)
    spec.loader.exec_module(module)
    return module


lock = _lock_module()


def _pin(path: Path, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}==(\S+)$", path.read_text(), re.MULTILINE)
    assert match, f"{path.name} does not pin {name}"
    return match.group(1)


def test_the_pins_agree_offline():
    pins = lock.read_lock()
    ray = _pin(REPO / "constraints.txt", "ray")
    assert lock.extra_requirements() == [f"ray[llm]=={ray}"], "the vllm extra must name the Ray of constraints.txt"
    assert pins["ray"] == ray
    # The installed Ray (the one constraints.txt pins) declares the vLLM its llm extra was tested with.
    wanted = [r for r in metadata.requires("ray") or [] if r.startswith("vllm") and 'extra == "llm"' in r]
    assert len(wanted) == 1 and f"=={pins['vllm']};" in wanted[0].replace(" ", ""), wanted
    # The reason for a venv of its own: vLLM's torch is not the training torch.
    assert pins["torch"] != _pin(REPO / "constraints.txt", "torch")
    assert "grain" not in pins  # installed editable from the checkout, never from an index


def test_compare_names_every_disagreement():
    pins = {"torch": "2.13.0", "ray": "2.60.0", "stale": "1.0"}
    assert lock.compare({"torch": "2.13.0", "ray": "2.60.0", "stale": "1.0"}, pins) == []
    problems = lock.compare({"torch": "2.13.0+cpu", "ray": "2.60.0", "new": "3"}, pins)
    assert problems == [
        "new 3 is resolved but not in the lock",
        "torch: the lock says 2.13.0, pip resolved 2.13.0+cpu",
        "stale==1.0 is in the lock but nothing requires it",
    ]


def test_pip_resolves_exactly_the_lock_for_a_gpu_machine():
    """grain's own requirements + ray[llm] + the lock resolve together, to exactly the lock (needs PyPI)."""
    pins = lock.read_lock()
    resolved = lock.resolve(lock.LOCK)
    assert resolved.pop("grain", None) is None  # its requirements are passed directly, not the project
    assert lock.compare(resolved, pins) == []
    assert (resolved["ray"], resolved["vllm"], resolved["torch"]) == ("2.60.0", pins["vllm"], pins["torch"])
    for name in ("torchvision", "transformers", "open-clip-torch", "prefect"):  # grain's own stack is in it
        assert resolved[name] == pins[name]


def test_a_lock_with_the_training_torch_fails(tmp_path):
    """The check can fail: the training venv's torch (constraints.txt) conflicts with vLLM's (needs PyPI)."""
    training_torch = _pin(REPO / "constraints.txt", "torch")
    text = (REPO / "constraints-describe-gpu.txt").read_text()
    bad = tmp_path / "conflicting.txt"
    bad.write_text(re.sub(r"^torch==\S+$", f"torch=={training_torch}", text, flags=re.MULTILINE))
    with pytest.raises(lock.LockError, match=rf"(?s)cannot resolve.*torch=={re.escape(training_torch)}"):
        lock.resolve(bad)
