"""TrainerCallbacks that connect TRL's loop to Ray Train: metrics, checkpoints, progress.

`ray.train.report` is a barrier: every rank calls it the same number of times (on each save and
at the export). Every rank reports its own checkpoint directory and Ray Train merges them into one
in storage: each rank writes files of its own there (its rng state, its ZeRO optimizer shard), so
a resume on any rank finds them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from raypost.metrics import peak_rss_mb


class ThroughputCallback(TrainerCallback):
    """Tokens/s per optimizer step from TRL's cumulative, all-rank `num_tokens` and wall time.

    `steady_tok_s` skips the first `warmup_steps` steps (compilation, allocator warm-up).
    `token_counter` (an object with `tokens_seen`, such as the row-packing collator) replaces
    TRL's count where TRL cannot see the real tokens, in the logs too."""

    def __init__(self, warmup_steps: int = 2, token_counter=None):
        self.warmup_steps = warmup_steps
        self.token_counter = token_counter
        self.last_time: float | None = None
        self.last_tokens: float | None = None
        self.tok_s: float | None = None
        self.step_times: list[float] = []
        self.step_tokens: list[float] = []
        self._step_start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._step_start is None:
            self._step_start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "num_tokens" not in logs:
            return
        if self.token_counter is not None:
            logs["num_tokens"] = _all_ranks_sum(self.token_counter.tokens_seen)
        now = time.perf_counter()
        tokens = float(logs["num_tokens"])
        # TRL's token counter restarts at 0 after a resume: start a new window then
        if self.last_tokens is not None and tokens > self.last_tokens and self.last_time is not None:
            self.tok_s = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
            self.step_times.append(now - self.last_time)
            self.step_tokens.append(tokens - self.last_tokens)
        elif self._step_start is not None:
            self.tok_s = tokens / max(now - self._step_start, 1e-9)
        self.last_time, self.last_tokens = now, tokens
        if self.tok_s:
            logs["tokens_per_s"] = round(self.tok_s, 2)
            # the Trainer copied `logs` into its history before the callbacks ran
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["tokens_per_s"] = logs["tokens_per_s"]
                state.log_history[-1]["num_tokens"] = logs["num_tokens"]

    @property
    def steady_tok_s(self) -> float | None:
        times = self.step_times[self.warmup_steps:] or self.step_times
        tokens = self.step_tokens[self.warmup_steps:] or self.step_tokens
        return sum(tokens) / sum(times) if times and sum(times) > 0 else None


def _all_ranks_sum(value: float) -> float:
    """Every rank logs at the same steps, so this collective is safe inside on_log."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(value)
    total = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total.item())


def _numeric(logs: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RayTrainReportCallback(TrainerCallback):
    """Each HF checkpoint as a Ray Train checkpoint with the last logged metrics; a progress line
    per log.

    Metrics go to Ray Train with the checkpoints only, as in Ray's own transformers callback: Ray
    Train v2 hands each report to the controller through a one-slot queue that it drains once per
    health check (2 s), so a report on every log blocked each short step until the next poll
    (a third of a tiny-model run's wall time, measured with py-spy). Per-step metrics stay in the
    log history, MLflow and TensorBoard."""

    def __init__(self, show_progress: bool = True):
        self.last_metrics: dict[str, float] = {}
        self.show_progress = show_progress

    def on_log(self, args, state, control, logs=None, **kwargs):
        import ray.train

        metrics = _numeric(logs or {})
        metrics["step"] = state.global_step
        metrics["epoch"] = float(state.epoch or 0.0)
        self.last_metrics = metrics
        if self.show_progress and ray.train.get_context().get_world_rank() == 0 and "loss" in metrics:
            from raypost import console

            detail = f"loss {metrics['loss']:.4f} lr {metrics.get('learning_rate', 0):.2e}"
            if "tokens_per_s" in metrics:
                detail += f" {metrics['tokens_per_s']:.0f} tok/s"
            console.worker_progress("train", state.global_step, state.max_steps, detail)

    def on_step_end(self, args, state, control, **kwargs):
        # the export follows the last step at once: a checkpoint of that step (weights, optimizer
        # and scheduler states, ~12 bytes a parameter) would be written only to be superseded
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_save = False

    def on_save(self, args, state, control, **kwargs):
        import ray.train
        import torch.distributed as dist
        from ray.train import Checkpoint

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        checkpoint_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # each rank's files differ (rank 0 alone writes the model, every rank its own shard)
        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
        metrics = {**self.last_metrics, "step": state.global_step, "peak_rss_mb": peak_rss_mb()}
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint-{state.global_step:08d}")


def _world_rank() -> int:
    import ray.train

    try:
        return ray.train.get_context().get_world_rank()
    except Exception:   # noqa: BLE001 - outside a Ray Train worker (the resident trainer): the only rank
        return 0


class CrashOnceCallback(TrainerCallback):
    """Fault drill: the worker process of `rank` exits hard after optimizer step `step`, once.

    The marker file makes it fire only in the first attempt, so the restarted run goes through.
    Used by the kill-and-resume test; also handy to rehearse recovery on a real cluster."""

    def __init__(self, step: int, marker: str, rank: int = 0):
        self.step, self.marker, self.rank = step, marker, rank

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and _world_rank() == self.rank:
            if not os.path.exists(self.marker):
                Path(self.marker).write_text(str(self.step))
                os._exit(1)
