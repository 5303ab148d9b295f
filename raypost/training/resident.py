"""A trainer that stays up across fits: one Ray actor that keeps TRL imported between rounds.

Every `train()` on Ray Train starts a run controller and a worker group, and the fresh worker
imports torch, transformers and TRL before it builds the trainer: measured on 2 cores, 21.6 s from
`train()` to a built trainer on a 2-step SmolLM2 fit and 5.6 s after its last step (the export
reported to Ray Train, persisted to storage and copied out). That cost does not depend on the
steps, so a loop that trains a few steps a round pays it every round: a fifth of a round in
bench/loop.py. The closed loop keeps its engines up for the same reason; `ResidentTrainer` is the
trainer's counterpart: the same worker loop (`fit_and_export`, shared with Ray Train's), run in one
actor that lives as long as its owner, so a fit costs the model load, the steps and the export.

What it keeps between fits is the process and its imports, not the model: each fit loads its
starting weights from the path it is given (the last round's export), as a Ray Train fit does, so
a fit's result does not depend on which way it ran, and a rerun after a crash starts from the same
weights. After a fit the actor hands freed host memory back to the system (glibc's malloc_trim:
the `retain` allocator keeps it otherwise, ~12 GB after a SmolLM2 fit) so it idles small beside
the engines.

One worker only: DDP and DeepSpeed need a process group across workers, which Ray Train sets up
per run; `supports()` says why a config cannot run here, and `train()` then ends the actor (its
GPU goes to the run) and uses Ray Train. A fit of another worker shape (resources, allocator,
threads) gets a new actor. The actor holds no CPUs (see `_start`): it is meant for a driver whose
phases alternate, the closed loop's. TRL's
checkpoints (every `checkpointing.save_steps`) go to `<output_dir>/hf`; a fit that dies (the actor
killed, OOM) is retried on a new actor from the last of them, up to `failure.max_failures`, and a
rerun of a killed driver resumes from them too. The output dir must be one the actor can write,
as the engines' weight sync needs it to be readable: one node, or a shared filesystem.
"""

from __future__ import annotations

import ctypes
import gc
import shutil
from pathlib import Path
from typing import Any

from raypost import console
from raypost.training.config import TrainConfig


def supports(config: TrainConfig) -> str | None:
    """Why `config` cannot run on a resident trainer, or None."""
    scaling = config.scaling
    if scaling.num_workers != 1:
        return f"scaling.num_workers is {scaling.num_workers}: a resident trainer is one worker"
    if scaling.deepspeed != "none":
        return f"scaling.deepspeed {scaling.deepspeed}: DeepSpeed runs on Ray Train's worker group"
    storage = config.checkpointing.storage_path
    if storage and "://" in storage:
        return f"checkpointing.storage_path {storage}: remote storage is written through Ray Train"
    return None


def _release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:   # pragma: no cover - torch is a dependency
        pass
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to hand back this way
        pass


class TrainerActor:
    def __init__(self):
        # the imports every fit needs, paid once for the actor's life
        import datasets  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401

        import raypost.training.methods  # noqa: F401

    def ready(self) -> bool:
        return True

    def fit(self, job: dict[str, Any]) -> str:
        import ray
        from transformers.trainer_utils import get_last_checkpoint

        from raypost.training.worker import fit_and_export

        config = TrainConfig.model_validate(job["config"])
        if not config.scaling.use_gpu:
            import torch

            # scaling.cpu_threads, else the worker's CPUs, as Ray sets them for a Ray Train worker
            torch.set_num_threads(job["threads"])
        output_dir = Path(job["output_dir"])
        hf_dir, export_dir = output_dir / "hf", output_dir / "export"
        resume_dir = get_last_checkpoint(str(hf_dir)) if hf_dir.is_dir() else None
        shutil.rmtree(export_dir, ignore_errors=True)
        try:
            fit_and_export(config, job["model_path"], ray.get(job["rows"]), hf_dir, export_dir, 0,
                           list(job.get("callbacks") or []), resume_dir)
        finally:
            _release_memory()
        return str(export_dir)


def _same_worker(a: TrainConfig, b: TrainConfig) -> bool:
    keys = ("use_gpu", "resources_per_worker", "allocator", "cpu_threads")
    return all(getattr(a.scaling, k) == getattr(b.scaling, k) for k in keys)


class ResidentTrainer:
    """The driver's handle: starts the actor on the first fit, restarts it when a fit loses it."""

    def __init__(self, config: TrainConfig, log=console.say):
        reason = supports(config)
        if reason is not None:
            raise ValueError(reason)
        self.config = config
        self.actor = None
        self.log = log
        self.starts = 0

    def accepts(self, config: TrainConfig) -> bool:
        """Whether `config` can run here (a fit of another worker shape restarts the actor)."""
        return supports(config) is None

    def _start(self) -> None:
        import ray

        from raypost.training.train import _worker_runtime_env

        resources = self._resources()
        env = _worker_runtime_env(self.config).get("env_vars", {})
        env = {**env, "OMP_NUM_THREADS": str(self._threads())}
        # no CPUs held: the actor idles between fits for the whole loop, and the loop's other CPU work
        # (engines, scoring tasks) runs while it idles; phases alternate, as with the engines, which
        # hold fractions of a CPU and use every core when they run. GPUs (and custom resources) are
        # held: a GPU is the trainer's for the loop.
        remote = ray.remote(TrainerActor).options(
            num_cpus=0, num_gpus=resources.get("GPU", 0),
            resources={k: v for k, v in resources.items() if k not in ("CPU", "GPU")} or None,
            max_concurrency=1, runtime_env={"env_vars": env})
        actor = remote.remote()
        ray.get(actor.ready.remote())
        self.actor = actor
        self.starts += 1

    def _resources(self) -> dict[str, float]:
        from raypost.training.train import _scaling_config

        return dict(_scaling_config(self.config).resources_per_worker)

    def _threads(self) -> int:
        return self.config.scaling.cpu_threads or max(1, int(self._resources().get("CPU", 1)))

    def fit(self, config: TrainConfig, model_path: str, rows_ref, output_dir: Path, callbacks: list | None,
            resume: bool) -> Path:
        """Train and export into `<output_dir>/export`; the path. A lost actor is replaced and the
        fit resumes from its last TRL checkpoint, up to `failure.max_failures` times."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        from raypost.training.train import TrainError

        if not resume:
            shutil.rmtree(Path(output_dir) / "hf", ignore_errors=True)
        if not _same_worker(self.config, config):   # another worker shape (a PRM's, say): a new actor
            self.close()
        self.config = config
        job = {"config": config.model_dump(), "model_path": model_path, "rows": rows_ref,
               "output_dir": str(output_dir), "callbacks": list(callbacks or []), "threads": self._threads()}
        failures = 0
        while True:
            if self.actor is None:
                self._start()
            try:
                return Path(ray.get(self.actor.fit.remote(job)))
            except RayTaskError as error:   # the fit raised: the actor is fine, the run is not
                raise TrainError(f"training failed: {error.cause or error}") from error
            except RayActorError as error:
                self.actor = None
                failures += 1
                if failures > config.failure.max_failures:
                    raise TrainError(f"training failed: the trainer was lost {failures} time(s), past "
                                     f"failure.max_failures {config.failure.max_failures}: {error}") from error
                self.log(f"train: the resident trainer was lost ({type(error).__name__}); a new one resumes "
                         f"from the last checkpoint ({failures} of {config.failure.max_failures})")

    def close(self) -> None:
        import ray

        if self.actor is not None:
            ray.kill(self.actor)
            self.actor = None
