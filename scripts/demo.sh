#!/usr/bin/env bash
# The main job on the embedded default: the built-in synthetic world through the whole pipeline
# (ingest → describe → ground → train → evaluate → report) as the Prefect flow `grain`.
# Without PREFECT_API_URL, Prefect's temporary local server runs for the run (and stops with it).
# Extra --set overrides go to the pipeline (e.g. --set ingest.synthetic.num_images=500).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1   # no telemetry from Prefect's server or client
.venv/bin/grain run --config configs/default.yaml "$@"
