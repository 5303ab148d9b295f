"""The host memory allocator of CPU training workers.

A training step frees and re-allocates the same large activation and gradient buffers every step.
glibc hands buffers above its mmap threshold back to the kernel on free, so each step faults
every page of them in again; a Ray Train worker runs the loop in a non-main thread, whose glibc
arena falls back to mmap as well. Measured on 2 cores (SmolLM2 SFT, 5 steps, docs/training.md):
13M page faults and ~30% of the CPU time in the kernel; with freed memory kept, 1.7M faults and
151 tok/s instead of 104-133 in the worker.

"retain" sets glibc's tunables so that every thread allocates from the main arena, which never
maps a buffer on its own and never trims: freed memory is reused by the next step. It costs
resident memory (peak RSS of tiny-model SFT 4.6 -> 8.5 GB, packed SmolLM2 12.2 -> 13.0 GB).
jemalloc (Ray's wheel ships one) was measured too: with purging off it grew past 17 GB on packed
SmolLM2 and was OOM-killed; with its default 10 s decay it faulted as much as glibc.
"""

from __future__ import annotations

import os
from typing import Literal

Allocator = Literal["retain", "system"]

GLIBC_RETAIN_ENV = {
    "MALLOC_ARENA_MAX": "1",        # the training thread's allocations go to the main arena...
    "MALLOC_MMAP_MAX_": "0",        # ...which then never maps big buffers on their own
    "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
    "MALLOC_TOP_PAD_": str(1 << 30),
}


def allocator_env(allocator: Allocator) -> dict[str, str]:
    """Environment variables that give a new worker process `allocator`. glibc reads them once at
    process start, so they belong in the worker's runtime_env."""
    if allocator == "system" or "LD_PRELOAD" in os.environ:  # a preloaded allocator of the user's own wins
        return {}
    return dict(GLIBC_RETAIN_ENV)


def active_allocator() -> str:
    """What this process runs with: 'retain', 'preloaded' (LD_PRELOAD) or 'system'."""
    if os.environ.get("LD_PRELOAD"):
        return "preloaded"
    if all(os.environ.get(key) == value for key, value in GLIBC_RETAIN_ENV.items()):
        return "retain"
    return "system"
