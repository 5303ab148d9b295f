#!/usr/bin/env bash
# The closed loop as a Ray job: RAY_ADDRESS=http://HEAD:8265 jobs/loop.sh [a.b=value ...]
# Resubmitting after a failure resumes it: the ledger and each finished phase live in output_dir
# (put it on shared storage on a multi-node cluster: name=... output_dir=/data/runs/{name}).
RAYPOST_COMMAND=loop exec "$(dirname "$0")/submit.sh" "${LOOP_RECIPE:-recipes/loop.yaml}" "$@"
