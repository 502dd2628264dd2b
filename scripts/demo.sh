#!/usr/bin/env bash
# The main job on the embedded default: the built-in synthetic world through the pipeline.
# Extra --set overrides go to every stage (e.g. --set ingest.synthetic.num_images=500).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/grain ingest --config configs/default.yaml "$@"
.venv/bin/grain describe --config configs/default.yaml "$@"
.venv/bin/grain ground --config configs/default.yaml "$@"
.venv/bin/grain inspect --config configs/default.yaml "$@"
.venv/bin/grain train --config configs/default.yaml "$@"
.venv/bin/grain evaluate --config configs/default.yaml "$@"
