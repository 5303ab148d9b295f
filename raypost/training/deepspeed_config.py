"""DeepSpeed config generated from the recipe's scaling block.

Batch sizes, lr and clipping are "auto" so HF TrainingArguments fill them in and the two can't
disagree. On CPU DeepSpeed runs in fp32 over gloo (torch.distributed is set up by Ray Train).
"""

from __future__ import annotations

from typing import Any

from raypost.training.config import ScalingBlock


def deepspeed_config(scaling: ScalingBlock) -> dict[str, Any] | None:
    if scaling.deepspeed == "none":
        return None
    stage = 2 if scaling.deepspeed == "zero2" else 3
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": scaling.use_gpu,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if scaling.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": scaling.use_gpu}
    if stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # export needs the full weights gathered on rank 0
            "stage3_gather_16bit_weights_on_model_save": True,
        })
        if scaling.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": scaling.use_gpu}
    bf16 = scaling.use_gpu and scaling.bf16
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
