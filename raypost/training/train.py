"""`train()`: SFT, KTO, DPO or ORPO with TRL inside a Ray Train `TorchTrainer`.

    result = train(TrainConfig(method="sft"), model="packaged:smollm2-135m-instruct",
                   dataset="runs/x/curate/sft", output_dir="runs/x/sft")
    result.model_dir   # HF safetensors checkpoint + tokenizer + chat template

The data is validated on the driver before any worker starts. A finished run leaves
`train_result.json`; calling again with the same inputs returns it without training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raypost import console
from raypost import records
from raypost.errors import StageError
from raypost.training.allocator import allocator_env
from raypost.training.config import TrainConfig
from raypost.training.data import load_training_rows
from raypost.training.worker import EXPORT_MARKER, LOG_HISTORY, train_loop_per_worker

RESULT_FILE = "train_result.json"
RUN_NAME = "train"


class TrainError(StageError):
    """A training run that cannot start or did not finish."""


@dataclass
class TrainResult:
    model_dir: str
    method: str
    steps: int
    base_model: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0
    rejected: int = 0
    ranks_consistent: bool | None = None
    peak_rss_mb_per_worker: list[float] = field(default_factory=list)
    trainer: str = "ray_train"   # or "resident": the fit ran on a training actor that stays up
    skipped: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        loss = self.metrics.get("train_loss")
        state = "already done" if self.skipped else "done"
        return (f"train {self.method}: {state}, {self.steps} steps, {self.rows} rows ({self.rejected} rejected), "
                f"train_loss {loss if loss is None else round(loss, 4)} -> {self.model_dir}")


def _resolve_model(model: str, cache_dir: str | None) -> str:
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    from raypost.models import resolve_model

    return str(Path(resolve_model(model, cache_dir)).resolve())


def _fingerprint(config: TrainConfig, model_path: str, dataset: Path) -> str:
    data_files = sorted(dataset.rglob("*")) if dataset.is_dir() else [dataset]
    stats = [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in data_files if p.is_file()]
    # where checkpoints go and how often a run logs don't change what it trains
    payload = config.model_dump(exclude={"checkpointing": {"storage_path"}, "tracking": True})
    blob = json.dumps([payload, model_path, stats], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_tracking(config: TrainConfig) -> None:
    if config.tracking.backend == "mlflow":
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            raise TrainError("tracking.backend: mlflow is not installed (pip install 'raypost[tracking]')")


def _scaling_config(config: TrainConfig):
    from ray.train import ScalingConfig

    scaling = config.scaling
    resources = scaling.resources_per_worker
    if resources is None:
        resources = {"CPU": 1.0, "GPU": 1.0} if scaling.use_gpu else {"CPU": 1.0}
    return ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources)


def _worker_runtime_env(config: TrainConfig) -> dict:
    if config.scaling.use_gpu:
        return {}
    env = allocator_env(config.scaling.allocator)
    return {"env_vars": env} if env else {}


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:   # another filesystem (remote storage downloaded to a temp dir)
        shutil.copy2(source, destination)


def _copy_model(checkpoint_dir: Path, target: Path) -> None:
    """The export into `<output_dir>/model`: hard links where the checkpoint storage shares the
    filesystem (a model's weights are written once, not copied again)."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint_dir / "model", tmp, copy_function=_link_or_copy)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _fit(trainer):
    """`trainer.fit()`, with the driver's Ctrl-C handler put back afterwards. Ray Train installs
    one that aborts its run controller; left in place, its closure keeps the finished controller
    actor referenced, so alive and idle, for the rest of the driver's life (a loop holds one per
    round; a test session held one past `ray.shutdown`), and a later Ctrl-C aborts a run that
    ended instead of stopping the driver."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _collect_export(directory: Path, output_dir: Path, where: str):
    """Metrics, log history, parameter digests and peak RSS of an export; its model is linked into
    `<output_dir>/model`."""
    if not (directory / EXPORT_MARKER).exists():
        raise TrainError(f"the last checkpoint {where} is not an export")
    metrics = json.loads((directory / EXPORT_MARKER).read_text())
    history = json.loads((directory / LOG_HISTORY).read_text())
    digests = {p.read_text() for p in directory.glob("param_digest_rank*.txt")}
    peaks = [float(p.read_text()) for p in sorted(directory.glob("peak_rss_mb_rank*.txt"))]
    _copy_model(directory, output_dir / "model")
    return metrics, history, digests, peaks


def _fit_on_ray_train(config: TrainConfig, model_path: str, data, output_dir: Path, resume: bool,
                      callbacks: list | None):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from raypost.runtime import ensure_ray

    storage = config.checkpointing.storage_path or str(output_dir / "ray")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
        if not resume:
            shutil.rmtree(Path(storage) / RUN_NAME, ignore_errors=True)
    elif not resume:
        raise TrainError("resume=False with a remote storage_path: pick a new storage_path instead")

    # Ray Train's print patch would echo each progress line twice in the driver's log
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ensure_ray()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.model_dump(),
            "model_path": model_path,
            "rows": ray.put(data.rows),
            "callbacks": list(callbacks or []),
        },
        scaling_config=_scaling_config(config),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=config.failure.max_failures),
            # +1: the export is the last checkpoint and must not push out the last training one early
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpointing.keep + 1),
            worker_runtime_env=_worker_runtime_env(config),
        ),
    )
    outcome = _fit(trainer)
    if outcome.error is not None:
        raise TrainError(f"training failed: {outcome.error}") from outcome.error
    checkpoint = outcome.checkpoint
    if checkpoint is None:
        raise TrainError("training finished without a checkpoint")
    with checkpoint.as_directory() as directory:
        return _collect_export(Path(directory), output_dir, str(checkpoint.path))


def train(config: TrainConfig, *, model: str, dataset: str | Path, output_dir: str | Path, resume: bool = True,
          cache_dir: str | None = None, callbacks: list | None = None, resident=None) -> TrainResult:
    """Train `model` on `dataset` (Parquet dir or JSONL in TRL's format for `config.method`).

    `resume`: continue from the last checkpoint of an interrupted run in the same storage.
    `callbacks`: extra transformers TrainerCallbacks run in every worker (picklable). `resident`: a
    `raypost.training.resident.ResidentTrainer` to fit on instead of a new Ray Train run, where it
    accepts the config (one worker, no DeepSpeed, local storage); otherwise it ends its actor and
    Ray Train runs the fit."""
    import ray

    from raypost.runtime import ensure_ray

    output_dir = Path(output_dir).expanduser().resolve()
    model_path = _resolve_model(model, cache_dir)
    data = load_training_rows(dataset, config.method)
    fingerprint = _fingerprint(config, model_path, Path(data.source))
    result_file = output_dir / RESULT_FILE
    if result_file.exists():
        saved = json.loads(result_file.read_text())
        if saved.get("fingerprint") == fingerprint and (output_dir / "model").is_dir():
            saved.pop("fingerprint")
            return TrainResult(**{**saved, "skipped": True})
        raise TrainError(f"{output_dir}: holds a finished run with another config, model or dataset; "
                         "remove the directory or choose another output_dir")
    _check_tracking(config)
    output_dir.mkdir(parents=True, exist_ok=True)
    if data.rejected:
        records.write_rejected(output_dir / "rejected", data.rejected)
        console.say(f"train: {len(data.rejected)} row(s) set aside in {output_dir / 'rejected'}; "
              f"first: {data.rejected[0].source}: {data.rejected[0].reason}")
    if config.tracking.backend != "none" and config.tracking.dir is None:
        config = config.model_copy(update={"tracking": config.tracking.model_copy(update={"dir": str(output_dir / "tracking")})})

    on_resident = resident is not None and resident.accepts(config)
    if resident is not None and not on_resident:
        resident.close()   # what it holds (a GPU) goes to the Ray Train run; a later fit starts it again
    if on_resident:
        ensure_ray()
        export = resident.fit(config, model_path, ray.put(data.rows), output_dir, callbacks, resume)
        collected = _collect_export(export, output_dir, str(export))
        # once the result is written: the export's files are linked into model/, and the TRL
        # checkpoints are only for resuming this fit
        leftovers = [export, output_dir / "hf"]
    else:
        leftovers = []
        collected = _fit_on_ray_train(config, model_path, data, output_dir, resume, callbacks)
    metrics, history, digests, peaks = collected

    result = TrainResult(
        model_dir=str(output_dir / "model"),
        method=config.method,
        steps=int(metrics["step"]),
        base_model=model_path,
        metrics=metrics,
        history=history,
        rows=len(data.rows),
        rejected=len(data.rejected),
        ranks_consistent=(len(digests) == 1) if digests else None,
        peak_rss_mb_per_worker=peaks,
        trainer="resident" if on_resident else "ray_train",
    )
    result_file.write_text(json.dumps({**result.as_dict(), "fingerprint": fingerprint}, indent=2, default=str))
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return result
