"""The `merge` recipe stage: a thin wrapper over `merge_checkpoints()`."""

from __future__ import annotations

from typing import Any

from raypost.config import RecipeError
from raypost.merging.config import MergeStage
from raypost.merging.merge import merge_checkpoints, merge_spec, read_marker

STAGE_PREFIX = "stage:"


def stage_model_reference(reference: str, context) -> str:
    """`stage:<name>` is the checkpoint that stage exported; anything else goes through `models`."""
    if not reference.startswith(STAGE_PREFIX):
        return context.model_reference(reference)
    name = reference[len(STAGE_PREFIX):]
    names = [stage.name for stage in context.recipe.stages]
    if name not in names:
        raise RecipeError(f"merge: model {reference!r}: no stage named {name!r}; stages: {names}")
    path = context.stage_dir(name) / "model"
    if not (path / "config.json").is_file():
        raise RecipeError(f"merge: model {reference!r}: {path} holds no exported checkpoint; run stage {name!r} first")
    return str(path)


def run_merge_stage(stage: MergeStage, context) -> dict[str, Any]:
    models = [stage_model_reference(m, context) for m in stage.models]
    base_model = stage_model_reference(stage.base_model, context) if stage.base_model else None
    output = context.stage_dir(stage.name) / "model"
    arguments = dict(method=stage.method, weights=stage.weights, base_model=base_model, t=stage.t,
                     density=stage.density, normalize=stage.normalize, rescale=stage.rescale, seed=stage.seed,
                     dtype=stage.dtype)
    finished = read_marker(output)
    if finished is not None and finished.get("request") == merge_spec(models, **arguments):
        print(f"merge[{stage.method}]: {output} is already complete; nothing to do", flush=True)
        return {**finished["summary"], "skipped": True}
    summary = merge_checkpoints(models, output, max_shard_size=stage.max_shard_size,
                                cache_dir=context.recipe.cache_dir, overwrite=True, **arguments)
    print(summary.line(), flush=True)
    return summary.as_dict()
