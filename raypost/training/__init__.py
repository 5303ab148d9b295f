"""Training on Ray Train with TRL: SFT, KTO, DPO, ORPO; DDP or DeepSpeed; LoRA; resumable."""

from raypost.training.config import TrainConfig, TrainStage
from raypost.training.data import DatasetError, load_training_rows
from raypost.training.train import TrainError, TrainResult, train

__all__ = ["DatasetError", "TrainConfig", "TrainError", "TrainResult", "TrainStage", "load_training_rows", "train"]
