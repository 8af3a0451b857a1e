#!/usr/bin/env bash
# Create .venv (Python 3.11 or 3.12) with every pinned dependency and the project installed editable.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3; do
    if command -v "$c" >/dev/null 2>&1; then PY=$c; break; fi
  done
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.fluoro2drr-deps
want=$(cat requirements.txt requirements-dev.txt scripts/setup_env.sh | sha1sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # torch first, pinned: a later unpinned requirement must never swap it for a CUDA build.
  python -m pip install -q torch==2.13.0
  python -m pip install -q --no-deps diffdrr==0.6.1
  python -m pip install -q -r requirements.txt -r requirements-dev.txt
  echo "$want" > "$stamp"
fi
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python -m pip install -q --no-deps -e .
