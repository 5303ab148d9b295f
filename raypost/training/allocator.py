"""The host memory allocator of CPU training workers.

A training step frees and re-allocates the same large activation and gradient buffers every step.
glibc hands buffers above its mmap threshold back to the kernel on free, so each step faults
every page of them in again; a Ray Train worker runs the loop in a non-main thread whose glibc
arena also falls back to mmap. Measured on 2 cores (SmolLM2 SFT, 5 steps, docs/training.md): 13M
page faults, ~30% of the CPU time in the kernel; with retained memory 1.6M faults and 150-156
tok/s instead of 104-133 in the worker. "retain" preloads the jemalloc that ships inside Ray's
wheel with purging off (the same setting Intel's PyTorch CPU tuning guide recommends), or, where
that library is missing, tells glibc to keep freed memory in one arena.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

Allocator = Literal["retain", "system"]

# freed pages stay mapped for reuse: the next step's buffers take them without a page fault
JEMALLOC_RETAIN_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
GLIBC_RETAIN_ENV = {
    "MALLOC_ARENA_MAX": "1",        # the training thread's allocations go to the main arena...
    "MALLOC_MMAP_MAX_": "0",        # ...which then never maps big buffers on their own
    "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
    "MALLOC_TOP_PAD_": str(1 << 30),
}


def ray_jemalloc() -> Path | None:
    """The jemalloc shared library inside Ray's wheel (Ray preloads it into its own daemons)."""
    import ray

    path = Path(ray.__file__).parent / "core" / "libjemalloc.so"
    return path if path.is_file() else None


def allocator_env(allocator: Allocator, jemalloc: Path | None = None) -> dict[str, str]:
    """Environment variables that give a new worker process `allocator`; they only take effect
    at process start, so they belong in the worker's runtime_env."""
    if allocator == "system" or "LD_PRELOAD" in os.environ:  # a preload of the user's own wins
        return {}
    jemalloc = jemalloc if jemalloc is not None else ray_jemalloc()
    if jemalloc is not None:
        return {"LD_PRELOAD": str(jemalloc), "MALLOC_CONF": JEMALLOC_RETAIN_CONF}
    return dict(GLIBC_RETAIN_ENV)


def active_allocator() -> str:
    """What this process runs with: 'jemalloc', 'glibc-retain' or 'system' (for the run's metrics)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    if "libjemalloc" in maps:
        return "jemalloc"
    if os.environ.get("MALLOC_MMAP_MAX_") == "0":
        return "glibc-retain"
    return "system"
