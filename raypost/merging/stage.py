"""The `merge` recipe stage: a thin wrapper over `merge_checkpoints()`.

Whether a finished merge is still up to date is the recipe's manifest's call (raypost.manifest), by
the content of the models it reads, so this stage always merges when it is asked to."""

from __future__ import annotations

from typing import Any

from raypost import console
from raypost.merging.config import MergeStage
from raypost.merging.merge import merge_checkpoints


def run_merge_stage(stage: MergeStage, context) -> dict[str, Any]:
    models = [context.model_reference(m) for m in stage.models]
    base_model = context.model_reference(stage.base_model) if stage.base_model else None
    output = context.stage_dir(stage.name) / "model"
    arguments = dict(method=stage.method, weights=stage.weights, base_model=base_model, t=stage.t,
                     density=stage.density, normalize=stage.normalize, rescale=stage.rescale, seed=stage.seed,
                     dtype=stage.dtype)
    summary = merge_checkpoints(models, output, max_shard_size=stage.max_shard_size,
                                cache_dir=context.recipe.cache_dir, overwrite=True, **arguments)
    console.say(summary.line())
    return summary.as_dict()
