#!/usr/bin/env bash
# Submit a recipe to a running Ray cluster as a Ray job and wait for it:
#
#   RAY_ADDRESS=http://HEAD:8265 jobs/submit.sh RECIPE [a.b=value ...]
#
# The exit code is the job's: 0 when it SUCCEEDED, non-zero when it FAILED or was stopped.
# Ray 2.60 clusters use token auth: the token comes from $RAY_AUTH_TOKEN, the file named by
# $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, and the client only sends it when
# RAY_AUTH_MODE=token, which this script sets whenever a token is available.
# Extra `ray job submit` flags (e.g. --no-wait, --submission-id ID) go in $RAY_JOB_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: jobs/submit.sh RECIPE [a.b=value ...]   (RAYPOST_COMMAND=loop for a loop recipe)" >&2
  exit 2
fi
recipe=$1
shift
if [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
  export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
fi
# shellcheck disable=SC2086  # RAY_JOB_ARGS is a list of flags on purpose
exec "${RAY:-ray}" job submit --working-dir . --runtime-env jobs/runtime_env.yaml ${RAY_JOB_ARGS:-} \
  -- python -m raypost "${RAYPOST_COMMAND:-run}" "$recipe" "$@"
