"""One TRL trainer per method, built from the recipe's method block.

The model is always passed as a path: TRL then loads it itself, which is what DPO/KTO need to
build their reference model (a model object built in memory breaks the reference copy).
"""

from __future__ import annotations

from typing import Any

from raypost.runtime import cpu_has_native_bf16
from raypost.training.config import TrainConfig
from raypost.training.deepspeed_config import deepspeed_config


def orpo_classes():
    """ORPO lives in `trl.experimental.orpo` in TRL 1.16 (pinned): the one place that imports it."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOConfig, ORPOTrainer


def trainer_classes(method: str):
    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        return SFTConfig, SFTTrainer
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOConfig, KTOTrainer
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    if method == "orpo":
        return orpo_classes()
    if method == "prm":
        from raypost.training.prm import PRMConfig, PRMTrainer

        return PRMConfig, PRMTrainer
    raise ValueError(f"unknown training method {method!r}")


def uses_bf16(config: TrainConfig) -> bool:
    """bf16 weights: GPU runs with `scaling.bf16`."""
    return config.scaling.use_gpu and config.scaling.bf16


def uses_cpu_bf16_autocast(config: TrainConfig) -> bool:
    """bf16 autocast over fp32 weights on CPUs with native bf16 (AVX512-BF16 or AMX), which is
    TRL's own default there: SmolLM2 SFT steps run ~2x faster than fp32 on such a CPU. Elsewhere
    bf16 is emulated and slower, so CPU runs stay fp32; DeepSpeed's CPU path stays fp32 too."""
    scaling = config.scaling
    if scaling.use_gpu or not scaling.bf16 or scaling.deepspeed != "none":
        return False
    return cpu_has_native_bf16()


def method_arguments(config: TrainConfig) -> dict[str, Any]:
    """Arguments specific to the method: the papers' knobs."""
    block = config.block
    if config.method == "sft":
        args = {"packing": block.packing, "max_length": block.max_length}
        if block.completion_only_loss is not None:
            args["completion_only_loss"] = block.completion_only_loss
        return args
    if config.method == "kto":
        return {"beta": block.beta, "desirable_weight": block.desirable_weight,
                "undesirable_weight": block.undesirable_weight, "max_length": block.max_length}
    if config.method == "dpo":
        return {"beta": block.beta, "loss_type": [block.loss_type], "max_length": block.max_length}
    if config.method == "prm":
        return {"max_length": block.max_length}
    return {"beta": block.beta, "max_length": block.max_length}


def warmup_steps(block) -> float:
    """transformers 5 has one knob, `warmup_steps`, read as a ratio of the total steps when below 1
    and as steps otherwise: a ratio of 1.0 passed through would mean one step, not all of them."""
    if block.warmup_steps is not None:
        return block.warmup_steps
    if block.warmup_ratio >= 1:
        return 1.0 - 1e-9   # every step but (at most) the last warms up
    return block.warmup_ratio


def training_arguments(config: TrainConfig, output_dir: str, report_to: list[str]):
    import torch

    config_class, _ = trainer_classes(config.method)
    block = config.block
    bf16 = uses_bf16(config)
    return config_class(
        output_dir=output_dir,
        per_device_train_batch_size=block.per_device_train_batch_size,
        gradient_accumulation_steps=block.gradient_accumulation_steps,
        learning_rate=block.learning_rate,
        num_train_epochs=block.num_train_epochs,
        max_steps=block.max_steps,
        lr_scheduler_type=block.lr_scheduler_type,
        warmup_steps=warmup_steps(block),
        weight_decay=block.weight_decay,
        max_grad_norm=block.max_grad_norm,
        gradient_checkpointing=block.gradient_checkpointing,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.checkpointing.save_steps,
        save_total_limit=config.checkpointing.keep,
        seed=config.seed,
        data_seed=config.seed,
        bf16=bf16 or uses_cpu_bf16_autocast(config),
        use_cpu=not config.scaling.use_gpu,
        deepspeed=deepspeed_config(config.scaling),
        report_to=report_to,
        disable_tqdm=True,
        dataloader_num_workers=0,
        # every parameter gets a gradient (LoRA's frozen ones are outside DDP): the Trainer's default
        # (True) re-walks the autograd graph after every backward for nothing
        ddp_find_unused_parameters=False,
        model_init_kwargs={"dtype": torch.bfloat16 if bf16 else torch.float32},
        **method_arguments(config),
    )


def lora_config(config: TrainConfig):
    block = config.block.lora
    if block is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=block.r, lora_alpha=block.alpha, lora_dropout=block.dropout,
                      target_modules=block.target_modules, task_type="CAUSAL_LM")


def build_trainer(config: TrainConfig, model_path: str, dataset, output_dir: str, report_to: list[str], callbacks: list):
    _, trainer_class = trainer_classes(config.method)
    return trainer_class(
        model=model_path,
        args=training_arguments(config, output_dir, report_to),
        train_dataset=dataset,
        callbacks=callbacks,
        peft_config=lora_config(config),
    )
