"""Deterministic fault injection for the loop's crash tests: SIGKILL the driver at a named point.

`RAYPOST_LOOP_FAULT=PHASE:ROUND[:N]` kills the driver in round ROUND at PHASE: `score` (the pool
is scored, nothing written), `teacher` (after N paid batches are in the ledger), `train` (at
optimizer step N, from inside the Ray Train worker, so the driver dies while training runs),
`eval` (the eval set is answered, nothing written). Each spec fires once per run directory (a
marker file remembers it), so the rerun that follows goes on. A kill at a known point instead of a
timer: a test must not pass or fail with the machine's speed.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "RAYPOST_LOOP_FAULT"


def _spec() -> tuple[str, int, int] | None:
    text = os.environ.get(ENV)
    if not text:
        return None
    phase, round_index, *rest = text.split(":")
    return phase, int(round_index), int(rest[0]) if rest else 0


def _marker(run_dir: Path) -> Path:
    return Path(run_dir) / f".fault-fired-{os.environ[ENV].replace(':', '-')}"


def armed(run_dir: Path, phase: str, round_index: int) -> int | None:
    """N of the armed fault for this phase and round, or None."""
    spec = _spec()
    if spec is None or spec[:2] != (phase, round_index) or _marker(run_dir).exists():
        return None
    return spec[2]


def fire(run_dir: Path, pid: int | None = None) -> None:
    _marker(run_dir).touch()
    os.kill(pid or os.getpid(), signal.SIGKILL)


def maybe_kill(run_dir: Path, phase: str, round_index: int, count: int = 0) -> None:
    n = armed(run_dir, phase, round_index)
    if n is not None and count >= n:
        fire(run_dir)


def training_callback(run_dir: Path, round_index: int):
    """A TrainerCallback that kills the driver at step N of this round's training, or None."""
    n = armed(run_dir, "train", round_index)
    if n is None:
        return None
    return KillDriverAtStep(str(run_dir), os.getpid(), max(1, n))


try:
    from transformers import TrainerCallback
except ImportError:   # pragma: no cover - transformers is a dependency
    TrainerCallback = object


class KillDriverAtStep(TrainerCallback):
    def __init__(self, run_dir: str, driver_pid: int, step: int):
        self.run_dir, self.driver_pid, self.step = run_dir, driver_pid, step
        self.spec = os.environ.get(ENV, "")

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and self.spec:
            os.environ[ENV] = self.spec
            fire(Path(self.run_dir), self.driver_pid)
