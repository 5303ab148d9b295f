"""The `train` recipe stage: a thin wrapper over `train()`.

`model: stage:<name>` starts from an earlier train stage's exported checkpoint (two-stage
SFT -> KTO, arXiv 2411.02939); `dataset: {stage: curate, split: kto}` reads an earlier stage's
output sub-dir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raypost import console
from raypost.config import RecipeError
from raypost.training.config import TrainStage
from raypost.training.train import train


def stage_dataset(stage: TrainStage, context) -> Path:
    ref = stage.dataset
    path = context.stage_output(ref.stage or ref.path)
    if ref.stage is not None and ref.split:
        path = path / ref.split
    if not path.exists():
        raise RecipeError(f"stages.{stage.name}.dataset: {path} does not exist")
    return path


def run_train_stage(stage: TrainStage, context) -> dict[str, Any]:
    result = train(
        stage.train_config(),
        model=context.model_reference(stage.model),
        dataset=stage_dataset(stage, context),
        output_dir=context.stage_dir(stage.name),
        cache_dir=context.recipe.cache_dir,
    )
    console.say(result.line())
    summary = result.as_dict()
    summary.pop("history")
    return summary
