"""Config of training: one block per method, scaling, checkpointing, failure, tracking.

Defaults run on a laptop CPU; the same recipe scales by changing `scaling`, not code. Method
defaults follow the papers and TRL: SFT lr 2e-5; DPO (Rafailov et al. 2023) and KTO
(Ethayarajh et al. 2024) beta 0.1 at lr ~5e-7..5e-6; ORPO (Hong et al. 2024) lambda 0.1 at lr 8e-6.
`prm` is a process reward model: a token-classification head on the model's architecture that
labels the last token of each reasoning step (arXiv 2412.08393; TRL 1.16 has no PRM trainer).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raypost.config import StrictModel

Method = Literal["sft", "kto", "dpo", "orpo", "prm"]


class LoraBlock(StrictModel):
    """LoRA via peft; merged into a full checkpoint on export."""

    r: int = Field(16, ge=1, description="rank")
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class MethodBlock(StrictModel):
    learning_rate: float = Field(2e-5, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="> 0 overrides num_train_epochs")
    per_device_train_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=16, description="tokens per example (per packed row for SFT)")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="share of the total steps spent warming up")
    warmup_steps: int | None = Field(None, ge=0, description="warm-up in steps; wins over warmup_ratio")
    lr_scheduler_type: str = "linear"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    lora: LoraBlock | None = Field(None, description="set to train a LoRA adapter instead of all weights")


class SFTBlock(MethodBlock):
    packing: bool = Field(True, description="best-fit-decreasing packing (TRL `bfd`): padding-free with FlashAttention, "
                                            "one masked row per packed row otherwise")
    completion_only_loss: bool | None = Field(None, description="default: True for prompt/completion data")


class KTOBlock(MethodBlock):
    learning_rate: float = Field(5e-6, gt=0)
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)
    per_device_train_batch_size: int = Field(4, ge=2, description="KTO's KL estimate needs >= 2")


class DPOBlock(MethodBlock):
    learning_rate: float = Field(5e-6, gt=0)
    beta: float = Field(0.1, gt=0)
    loss_type: str = Field("sigmoid", description="TRL DPO loss: sigmoid (DPO), ipo, hinge, ...")


class ORPOBlock(MethodBlock):
    learning_rate: float = Field(8e-6, gt=0)
    beta: float = Field(0.1, gt=0, description="lambda of the odds-ratio term (ORPO paper)")


class PRMBlock(MethodBlock):
    """Binary cross-entropy per step: the label of each step sits on its last token."""

    @model_validator(mode="after")
    def _no_lora(self) -> "PRMBlock":
        if self.lora is not None:
            raise ValueError("lora: not supported for prm (the new classification head trains in full)")
        return self


class ScalingBlock(StrictModel):
    """Ray Train workers. On GPUs: use_gpu + deepspeed zero2/zero3 + bf16. On CPUs: DDP over gloo."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = Field(None, description='e.g. {"CPU": 4, "GPU": 1}')
    deepspeed: Literal["none", "zero2", "zero3"] = "none"
    offload_optimizer: bool = Field(False, description="ZeRO: optimizer states in CPU memory")
    offload_params: bool = Field(False, description="ZeRO-3: parameters in CPU memory")
    bf16: bool = Field(True, description="bf16 on GPU; on CPUs with native bf16 (AVX512-BF16/AMX) bf16 autocast "
                                         "over fp32 weights, without DeepSpeed; fp32 elsewhere")
    cpu_threads: int | None = Field(None, ge=1, description="CPU workers: torch threads (default: the worker's "
                                   "whole CPUs, as Ray sets them); more than its CPUs where engines that hold "
                                   "CPUs of their own sit idle while it trains (the closed loop)")
    allocator: Literal["retain", "system"] = Field(
        "retain", description="CPU workers: 'retain' keeps freed host memory for the next step (glibc "
                              "tunables) instead of faulting it in again, for more resident memory; "
                              "'system' leaves the process allocator alone")

    @model_validator(mode="after")
    def _offload(self) -> "ScalingBlock":
        if self.offload_params and self.deepspeed != "zero3":
            raise ValueError("offload_params needs deepspeed: zero3")
        if self.offload_optimizer and self.deepspeed == "none":
            raise ValueError("offload_optimizer needs deepspeed: zero2 or zero3")
        return self


class CheckpointingBlock(StrictModel):
    save_steps: int = Field(50, ge=1, description="a Ray Train checkpoint every N optimizer steps")
    keep: int = Field(2, ge=1, description="checkpoints kept in storage")
    storage_path: str | None = Field(None, description="local dir or URI (s3://, gs://); default <output_dir>/ray")


class FailureBlock(StrictModel):
    max_failures: int = Field(1, ge=-1, description="worker-group restarts from the last checkpoint; -1: no limit")


class TrackingBlock(StrictModel):
    backend: Literal["none", "tensorboard", "mlflow"] = "none"
    dir: str | None = Field(None, description="local log dir (MLflow: file store); default <output_dir>/tracking")


class TrainConfig(StrictModel):
    method: Method = "sft"
    sft: SFTBlock = Field(default_factory=SFTBlock)
    kto: KTOBlock = Field(default_factory=KTOBlock)
    dpo: DPOBlock = Field(default_factory=DPOBlock)
    orpo: ORPOBlock = Field(default_factory=ORPOBlock)
    prm: PRMBlock = Field(default_factory=PRMBlock)
    scaling: ScalingBlock = Field(default_factory=ScalingBlock)
    checkpointing: CheckpointingBlock = Field(default_factory=CheckpointingBlock)
    failure: FailureBlock = Field(default_factory=FailureBlock)
    tracking: TrackingBlock = Field(default_factory=TrackingBlock)
    logging_steps: int = Field(1, ge=1)
    seed: int = 0

    @property
    def block(self) -> MethodBlock:
        return getattr(self, self.method)


class DatasetRef(StrictModel):
    """A training set: an earlier stage's output (optionally one split sub-dir) or a path."""

    stage: str | None = None
    split: str | None = Field(None, description="sub-dir of the stage output, e.g. sft, kto, preference")
    path: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "DatasetRef":
        if (self.path is None) == (self.stage is None):
            raise ValueError("give exactly one of `path` or `stage`")
        return self


class TrainStage(TrainConfig):
    kind: Literal["train"]
    name: str = "train"
    model: str = Field("student", description="a name from `models`, a model reference, or stage:<train stage>")
    dataset: DatasetRef

    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.model_dump(include=set(TrainConfig.model_fields)))
