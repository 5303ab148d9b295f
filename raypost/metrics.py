"""Rows committed and rows set aside, counted where they are written, as Ray metrics.

Every part the workers commit (`raypost.generation.batches.commit_part`: generation, curation,
evaluation's item rows) adds its rows to `raypost_rows_committed` or, for rejected rows,
`raypost_rows_rejected`, tagged with the stage's output directory. Ray's metrics agent on each
node exports them with Ray Data's own per-operator metrics (rows out, throughput; the datasets
raypost runs are named after their stage and output, `named`): on a cluster they are in the
Ray dashboard and Prometheus (`rate(ray_raypost_rows_committed_total[1m])` is rows/s), while a
run is going and from every node. The driver's progress bar and summary count the same rows from
the one row of counts each committed part sends back.
"""

from __future__ import annotations

import re
from typing import Any

_COUNTERS: dict[str, Any] = {}
_DESCRIPTIONS = {
    "raypost_rows_committed": "rows committed to a raypost stage's output (Parquet parts)",
    "raypost_rows_rejected": "rows a raypost stage set aside, with their reason, under its rejected/",
}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not `ru_maxrss`: Linux carries the parent's
    peak into it across fork and exec, so a small process started by a large one reports the
    large one's peak."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count(directory: str, rows: int, *, rejected: bool = False) -> None:
    """Add `rows` to the counter of `directory`; a process outside Ray records nothing."""
    if rows <= 0:
        return
    import ray

    if not ray.is_initialized():
        return
    name = "raypost_rows_rejected" if rejected else "raypost_rows_committed"
    if name not in _COUNTERS:
        from ray.util.metrics import Counter

        _COUNTERS[name] = Counter(name, description=_DESCRIPTIONS[name], tag_keys=("output",))
    _COUNTERS[name].inc(rows, tags={"output": str(directory)})


def dataset_name(stage: str, output: str) -> str:
    """`raypost-<stage>-<output path as a file name>`: Ray Data names a log file after it."""
    return f"raypost-{stage}-" + re.sub(r"[^A-Za-z0-9._-]+", "_", str(output)).strip("_")[-100:]


def named(dataset, stage: str, output: str):
    """`dataset`, named so that Ray Data's own metrics (and its log file) of this run say which
    stage and output."""
    dataset.set_name(dataset_name(stage, output))
    return dataset
