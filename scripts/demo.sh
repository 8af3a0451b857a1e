#!/usr/bin/env bash
# One command: set up .venv and run the end-to-end demo on a simulated knee (no data needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/fluoro2drr demo --out "${1:-demo_out}"
