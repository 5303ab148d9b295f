"""The Ray Train worker loop: build the TRL trainer, train (resuming from Ray's checkpoint), export.

Each rank works in its own local scratch dir; Ray Train merges what the ranks report into one
checkpoint in storage (every rank reports, so a rank's own files, such as its ZeRO shard, are kept). The last checkpoint a run reports is the export (full HF model,
tokenizer, chat template) marked by EXPORT_MARKER: a restarted run that finds it is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

EXPORT_MARKER = "raypost_export.json"
LOG_HISTORY = "log_history.json"


def param_digest(model) -> str:
    """A content hash of all parameters: equal on every rank after a correct DDP/ZeRO-2 step."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _report_to(config, rank: int) -> list[str]:
    tracking = config.tracking
    if tracking.backend == "none" or rank != 0:
        return ["none"]
    if tracking.backend == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = tracking.dir
        return ["tensorboard"]
    os.environ["MLFLOW_TRACKING_URI"] = Path(tracking.dir).resolve().as_uri()
    # MLflow 3 refuses a file store unless told otherwise; a database backend needs the full
    # mlflow package (SQLAlchemy, alembic), which does not fit beside vLLM's pins
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "raypost")
    return ["mlflow"]


def _merge_lora(model_path: str, adapter_dir: Path, target: Path, dtype) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(target, safe_serialization=True)


def _export(trainer, config, model_path: str, target: Path, rank: int) -> None:
    """Final HF safetensors checkpoint with tokenizer and chat template (LoRA merged)."""
    import torch

    from raypost.training.methods import uses_bf16

    staging = target.parent / "trainer_save"
    # collective under ZeRO-3 (gathers the partitioned weights): every rank calls it
    trainer.save_model(str(staging))
    if rank != 0:
        return
    if config.block.lora is not None:
        _merge_lora(model_path, staging, target, torch.bfloat16 if uses_bf16(config) else torch.float32)
    else:
        target.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():
            if item.name != "training_args.bin":
                shutil.move(str(item), target / item.name)
    shutil.rmtree(staging, ignore_errors=True)
    trainer.processing_class.save_pretrained(target)


def fit_and_export(config, model_path: str, rows: list[dict], hf_dir: Path, export_dir: Path, rank: int,
                   callbacks: list, resume_dir: str | None) -> dict[str, Any]:
    """Build the TRL trainer, train (from `resume_dir`, a TRL checkpoint, where given) and write the
    export into `export_dir`: the model, and on rank 0 the log history and EXPORT_MARKER with the
    metrics. Shared by the Ray Train worker loop and the resident trainer (raypost.training.resident)."""
    import datasets
    from transformers.trainer_callback import PrinterCallback

    from raypost.training.allocator import active_allocator
    from raypost.metrics import peak_rss_mb
    from raypost.training.callbacks import ThroughputCallback
    from raypost.training.methods import build_trainer
    from raypost.training.packing import use_row_packing

    if config.scaling.cpu_threads and not config.scaling.use_gpu:
        import torch

        torch.set_num_threads(config.scaling.cpu_threads)
    dataset = datasets.Dataset.from_list(rows)
    trainer = build_trainer(config, model_path, dataset, str(hf_dir), _report_to(config, rank), callbacks)
    # packed SFT rows without FlashAttention: the collator then counts the real tokens
    row_packing = use_row_packing(trainer) if config.method == "sft" else None
    throughput = ThroughputCallback(token_counter=row_packing)
    # first, so every later callback (Ray, TensorBoard, MLflow) sees tokens_per_s
    trainer.callback_handler.callbacks.insert(0, throughput)
    # raypost prints one progress line per log instead of the raw dicts
    trainer.remove_callback(PrinterCallback)
    if rank == 0 and resume_dir:
        from raypost import console

        console.worker_say(f"train: resuming from {resume_dir}")
    output = trainer.train(resume_from_checkpoint=resume_dir)

    _export(trainer, config, model_path, export_dir / "model", rank)
    export_dir.mkdir(parents=True, exist_ok=True)
    if config.scaling.deepspeed != "zero3":
        (export_dir / f"param_digest_rank{rank}.txt").write_text(param_digest(trainer.accelerator.unwrap_model(trainer.model)))
    metrics = {
        "step": trainer.state.global_step,
        "train_loss": float(output.training_loss),
        "train_runtime_s": float(output.metrics.get("train_runtime", 0.0)),
        "steady_tokens_per_s": throughput.steady_tok_s or 0.0,
        "peak_rss_mb": peak_rss_mb(),
        "host_allocator": active_allocator(),
    }
    (export_dir / f"peak_rss_mb_rank{rank}.txt").write_text(f"{peak_rss_mb():.1f}")
    if rank == 0:
        (export_dir / LOG_HISTORY).write_text(json.dumps(trainer.state.log_history, default=float))
        (export_dir / EXPORT_MARKER).write_text(json.dumps(metrics))
    return metrics


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    from raypost.training.callbacks import RayTrainReportCallback
    from raypost.training.config import TrainConfig

    config = TrainConfig.model_validate(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    rows = ray.get(loop_config["rows"])

    with contextlib.ExitStack() as stack:
        resume_dir = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            resume_dir = stack.enter_context(checkpoint.as_directory())
            if (Path(resume_dir) / EXPORT_MARKER).exists():
                return  # a restart after the export was stored: nothing left to do
        scratch = Path(tempfile.mkdtemp(prefix=f"raypost-train-rank{rank}-"))
        stack.callback(shutil.rmtree, scratch, True)

        export_dir = scratch / "export"
        metrics = fit_and_export(config, loop_config["model_path"], rows, scratch / "hf", export_dir, rank,
                                 [RayTrainReportCallback(), *loop_config.get("callbacks", [])], resume_dir)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(export_dir)), checkpoint_dir_name="export")
