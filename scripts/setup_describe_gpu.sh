#!/usr/bin/env bash
# Create the GPU describe venv (.venv-describe-gpu): grain (editable) with its `vllm` extra, pinned by
# constraints-describe-gpu.txt, for `grain describe --set describe.engine=vllm` (offline vLLM in Ray Data).
#
# Why a venv of its own: the extra is ray[llm]==2.60.0 (the Ray of constraints.txt), which requires
# vllm[audio]==0.29.0, which pins torch==2.13.0 (CUDA 13.0 wheels) -- not the training torch of .venv
# (constraints.txt). Installing the extra into .venv would either fail against constraints.txt or replace the
# training torch. The lock holds every package of this venv, as pip resolves it from PyPI for CPython 3.11 on
# manylinux x86_64 (scripts/describe_gpu_lock.py writes and checks it; tests/test_describe_gpu_env.py runs the
# check in CI).
#
# Needs: Linux x86_64, glibc >= 2.31, python3.11, PyPI (several GB of CUDA wheels), and on the machine that runs
# describe an NVIDIA driver for CUDA 13.0 (>= 580). Idempotent: a venv whose stamp matches this script,
# pyproject.toml and the lock is left alone.
#
#   bash scripts/setup_describe_gpu.sh            # create or refresh the venv
#   bash scripts/setup_describe_gpu.sh --check    # only check that pip resolves the lock here (no install)
#   .venv-describe-gpu/bin/grain describe --set describe.engine=vllm ...   (docs/describe.md)
#
# Env: GRAIN_DESCRIBE_GPU_VENV (venv path, default .venv-describe-gpu), GRAIN_DESCRIBE_GPU_PYTHON (default
# python3.11).
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."

VENV=${GRAIN_DESCRIBE_GPU_VENV:-.venv-describe-gpu}
PY=${GRAIN_DESCRIBE_GPU_PYTHON:-$(command -v python3.11 || true)}
LOCK=constraints-describe-gpu.txt
STAMP="$VENV/.grain-describe-gpu-stamp"
stamp_now=$(cat "$SELF" pyproject.toml "$LOCK" | sha256sum | cut -c1-16)

fail() { echo "setup_describe_gpu: $*" >&2; exit 1; }

if [ -z "$PY" ]; then
  fail "python3.11 not found (set GRAIN_DESCRIBE_GPU_PYTHON)"
fi
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || fail "$PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); $LOCK is resolved for 3.11 (set GRAIN_DESCRIBE_GPU_PYTHON)"

if [ "${1:-}" = "--check" ]; then
  exec "$PY" scripts/describe_gpu_lock.py --check
fi
[ $# -eq 0 ] || fail "unknown argument $1 (usage: setup_describe_gpu.sh [--check])"

if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$stamp_now" ]; then
  exit 0
fi
# The lock's wheels exist for Linux x86_64 only, and some need glibc 2.31 (llguidance, tensorboard-data-server).
"$PY" - <<'PYEOF' || exit 1
import platform, sys
machine, (libc, version) = platform.machine(), platform.libc_ver()
if sys.platform != "linux" or machine != "x86_64":
    sys.exit(f"setup_describe_gpu: the locked vLLM/torch wheels are for Linux x86_64, not {sys.platform} {machine}")
if libc != "glibc" or tuple(int(p) for p in version.split(".")[:2]) < (2, 31):
    sys.exit(f"setup_describe_gpu: the locked wheels need glibc >= 2.31, this system has {libc or 'no glibc'} {version}")
PYEOF

start=$(date +%s)
echo "setup_describe_gpu: installing grain[vllm] from $LOCK into $VENV (first time: several GB of CUDA wheels)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VPY" -m pip install --quiet --upgrade pip
# Every package is pinned by the lock; the extra brings ray[llm] -> vllm[audio] -> vLLM's torch.
"$VPY" -m pip install --quiet -c "$LOCK" -e ".[vllm]"
"$VPY" -m pip check

# Import check: what `grain describe` with engine=vllm needs, and a CUDA build of torch (a local wheel folder or
# index serving a CPU build of the same version would satisfy the pin and still not run on the GPU).
# torch is checked first: torchvision's CUDA wheel does not even import beside a CPU torch.
"$VPY" - <<'PYEOF'
import sys

import torch

if torch.version.cuda is None:
    sys.exit(f"setup_describe_gpu: torch {torch.__version__} is a CPU build; the GPU describe venv needs the CUDA "
             "wheel from PyPI (a local wheel folder or index served this one: check PIP_FIND_LINKS, PIP_INDEX_URL, "
             "pip.conf), then rerun")

import ray, torchvision, transformers, vllm
from ray.data.llm import build_processor, vLLMEngineProcessorConfig  # noqa: F401
import grain.annotate.describe, grain.annotate.engines  # noqa: F401

gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU visible here"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}; {gpu}), torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}, vllm {vllm.__version__}, ray {ray.__version__}")
PYEOF
echo "$stamp_now" > "$STAMP"
echo "setup_describe_gpu: done in $(( $(date +%s) - start )) s; run: $VENV/bin/grain describe --set describe.engine=vllm ..." >&2
