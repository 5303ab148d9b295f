"""Starting or joining Ray.

Without RAY_ADDRESS (or --address) raypost starts an embedded local Ray; with it, it joins
that cluster. A head started by `ray start` on Ray 2.60 uses token auth: the token is picked up
from the environment (RAY_AUTH_TOKEN) or the default token file, as Ray's own tools do.
"""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray Data's own progress bars would interleave with raypost's; raypost prints its own.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
