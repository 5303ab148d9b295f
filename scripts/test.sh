#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAYPOST_CACHE=${RAYPOST_CACHE:-$PWD/.cache/raypost}
exec .venv/bin/python -m pytest -q "$@"
