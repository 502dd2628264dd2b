#!/usr/bin/env bash
# Create or refresh the project venv (.venv) from pyproject.toml + constraints.txt. Idempotent: a venv whose
# stamp matches the current dependency files is left alone, so the README commands cost nothing the second time.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${GRAIN_PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${GRAIN_VENV:-.venv}
stamp_now=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)

if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.grain-stamp" 2>/dev/null)" = "$stamp_now" ]; then
  exit 0
fi
echo "setup: installing grain and its pinned dependencies into $VENV (first time: a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# constraints.txt pins every transitive package to the set CI is tested with (torch/torchvision included).
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[dev]"
"$VENV/bin/python" -m pip check >/dev/null
echo "$stamp_now" > "$VENV/.grain-stamp"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, prefect, ray; print(f"torch {torch.__version__}, prefect {prefect.__version__}, ray {ray.__version__}")'))" >&2
