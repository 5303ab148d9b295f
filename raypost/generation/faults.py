"""Deterministic faults for generation's crash tests, fired from inside an engine actor.

`RAYPOST_GENERATE_FAULT` (read by the driver, handed to the actors):
- `INT:N` / `KILL:N`: after an actor committed its Nth part, Ctrl-C the driver's process group
  (as a terminal does) or SIGKILL the driver, then write nothing more. Fires once per output
  directory (a marker file remembers it), so the rerun that follows goes on.
- `hold:N:GATE`: after its Nth part an actor touches `GATE.arrived-<node id>-<pid>` and waits
  until the file GATE exists: a test can remove that actor's node while it is known to be mid-run.

A fault at a known point instead of a timer: a test must not pass or fail with the machine's speed.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "RAYPOST_GENERATE_FAULT"


@dataclass
class WorkerFault:
    action: str
    after: int
    driver_pid: int
    marker: str
    gate: str | None = None
    written: int = 0

    @classmethod
    def spec(cls, output_dir: str | os.PathLike) -> dict | None:
        """The driver's fault spec for its actors, or None."""
        text = os.environ.get(ENV)
        if not text:
            return None
        action, after, *rest = text.split(":", 2)
        if action not in ("INT", "KILL", "hold") or (action == "hold") != bool(rest):
            raise ValueError(f"{ENV}={text!r}: expected INT:N, KILL:N or hold:N:GATE")
        marker = str(Path(output_dir) / f".fault-fired-{action}-{after}")
        return dict(action=action, after=int(after), driver_pid=os.getpid(), marker=marker,
                    gate=rest[0] if rest else None)

    def part_written(self) -> None:
        self.written += 1
        if self.written != self.after:
            return
        if self.action == "hold":
            import ray

            node = ray.get_runtime_context().get_node_id()
            Path(f"{self.gate}.arrived-{node}-{os.getpid()}").touch()
            while not os.path.exists(self.gate):
                time.sleep(0.05)
            return
        if os.path.exists(self.marker):
            return
        Path(self.marker).touch()
        if self.action == "INT":
            os.killpg(os.getpgid(self.driver_pid), signal.SIGINT)
        else:
            os.kill(self.driver_pid, signal.SIGKILL)
        threading.Event().wait()   # the run ends around this actor; it commits nothing more
