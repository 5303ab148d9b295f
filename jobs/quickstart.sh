#!/usr/bin/env bash
# The quickstart recipe as a Ray job: RAY_ADDRESS=http://HEAD:8265 jobs/quickstart.sh [a.b=value ...]
exec "$(dirname "$0")/submit.sh" recipes/quickstart.yaml "$@"
