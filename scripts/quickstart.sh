#!/usr/bin/env bash
# Set up .venv (if needed) and run the quickstart recipe on a local Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/raypost run recipes/quickstart.yaml "$@"
