"""The `train` recipe stage: a thin wrapper over `train()`.

`model: stage:<name>` starts from an earlier train stage's exported checkpoint (two-stage
SFT -> KTO, arXiv 2411.02939); `dataset: {stage: curate, split: kto}` reads an earlier stage's
output sub-dir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raypost.config import RecipeError, resolve_data_path
from raypost.training.config import TrainStage
from raypost.training.train import train

STAGE_PREFIX = "stage:"


def stage_model(stage: TrainStage, context) -> str:
    if stage.model.startswith(STAGE_PREFIX):
        source = stage.model[len(STAGE_PREFIX):]
        model_dir = context.stage_dir(source) / "model"
        if not model_dir.is_dir():
            raise RecipeError(f"stages.{stage.name}.model: stage {source!r} has no exported model at {model_dir}; run it first")
        return str(model_dir)
    return context.model_reference(stage.model)


def stage_dataset(stage: TrainStage, context) -> Path:
    ref = stage.dataset
    if ref.stage is not None:
        path = context.stage_dir(ref.stage)
        if ref.split:
            path = path / ref.split
    else:
        path = resolve_data_path(ref.path, context.recipe.source)
    if not path.exists():
        raise RecipeError(f"stages.{stage.name}.dataset: {path} does not exist")
    return path


def run_train_stage(stage: TrainStage, context) -> dict[str, Any]:
    result = train(
        stage.train_config(),
        model=stage_model(stage, context),
        dataset=stage_dataset(stage, context),
        output_dir=context.stage_dir(stage.name),
        cache_dir=context.recipe.cache_dir,
    )
    print(result.line(), flush=True)
    summary = result.as_dict()
    summary.pop("history")
    return summary
