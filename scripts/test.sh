#!/usr/bin/env bash
# One command: set up .venv and run the headless test suite, one worker process per core (at most 4; each test
# runs torch on one thread). FLUORO2DRR_TEST_WORKERS=0 runs it in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
cores=$(nproc 2>/dev/null || echo 1)
workers=${FLUORO2DRR_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
exec .venv/bin/python -m pytest -q -n "$workers" --dist load "$@"
