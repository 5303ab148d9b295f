"""Starting or joining Ray.

Without RAY_ADDRESS (or --address) raypost starts an embedded local Ray; with it, it joins
that cluster. A head started by `ray start` on Ray 2.60 uses token auth: the token is picked up
from the environment (RAY_AUTH_TOKEN) or the default token file, as Ray's own tools do.
"""

from __future__ import annotations

import os


# set by `raypost serve` for the Ray it starts: the address HAProxy's side ports bind to
SERVE_BIND_ENV = "RAYPOST_SERVE_BIND_HOST"


# Idle worker processes stay a minute, not Ray's one second: a pipeline's steps (a map, a
# shuffle, a task on a worker) each need a few light workers, and a worker started anew costs
# seconds of imports. On 2 cores a 20-row groupby took 4 s with fresh workers, 0.1 s with warm ones.
LOCAL_RAY_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}


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
        # no dashboard on a local Ray (a process and ports a CLI run does not need); every
        # worker process then drops the one warning that its absence causes (see below)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": "raypost.runtime.setup_worker"},
                 _system_config=LOCAL_RAY_CONFIG)
    # ray.init installs SIGTERM handlers of its own (see interrupt_on_sigterm)
    interrupt_on_sigterm()
    from raypost import console

    console.attach_ray()
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def shared(value) -> list:
    """`value` put in the object store once, for a Ray Data map's `fn_kwargs`: every task then
    fetches the one stored copy instead of carrying its own pickled copy. Wrapped in a list
    because Ray resolves an object ref only where it is a task's own argument."""
    import ray

    return [ray.put(value)]


def unshared(wrapped: list):
    """The value `shared` wrapped (a caller in one process may pass `[value]` itself)."""
    import ray

    value = wrapped[0]
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """SIGTERM (kill, Kubernetes, systemd) stops raypost as Ctrl-C does: finally blocks run and
    the Ray it started shuts down. Python's default ends the process on the spot, and after
    `ray.init` the core worker's own handler aborts the driver with a stack dump; either way
    Ray's agents and shared-memory segments stayed behind."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


class _DropMessage:
    def __init__(self, text: str):
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()


def quiet_worker_logs() -> None:
    """Ray Train's placement-group cleaner asks the state API (served by the dashboard) whether
    the train controller lives, every second of every fit; without a dashboard each ask logs a
    warning, dozens per training stage in the user's console. The cleaner only matters when a
    controller dies without cleaning up, which a local Ray ends with the driver anyway."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").addFilter(
        _DropMessage("Failed to query Ray Train Controller actor state"))


def setup_worker() -> None:
    """Run in every worker process of a Ray that raypost starts itself."""
    quiet_worker_logs()
    host = os.environ.get(SERVE_BIND_ENV)
    if host:
        from raypost.serving.high_throughput import bind_haproxy_side_ports

        bind_haproxy_side_ports(host)



def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: elsewhere (AVX2 machines such as the 2-core ones raypost is tested
    on) bf16 matmuls are emulated, several times slower than fp32."""
    import torch

    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


def cpu_dtype(requested: str) -> str:
    """The dtype a CPU engine loads a model in: `auto` (the checkpoint's own, bf16 for SmolLM2)
    becomes float32 where the CPU has no native bf16."""
    if requested != "auto" or cpu_has_native_bf16():
        return requested
    return "float32"
