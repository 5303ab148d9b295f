"""The `curate` recipe stage: a thin wrapper over `curate()`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raypost.config import RecipeError, resolve_data_path
from raypost.curation.config import CurateStage
from raypost.curation.pipeline import curate, load_rows


def input_path(stage: CurateStage, context) -> Path:
    """`input` names an earlier stage (its output directory) or is a path."""
    names = [s.name for s in context.recipe.stages]
    if stage.input in names:
        return context.stage_dir(stage.input)
    # like every data path: the working directory first, then beside the recipe
    path = resolve_data_path(stage.input, context.recipe.source)
    if not path.exists():
        where = f"{context.recipe.source}: " if context.recipe.source else ""
        raise RecipeError(f"{where}stages.{stage.name}.input: {stage.input!r} is neither a stage ({names}) "
                          f"nor a path (looked in the working directory and beside the recipe)")
    return path


def stage_dir_resolver(context):
    names = {s.name for s in context.recipe.stages}
    return lambda name: context.stage_dir(name) if name in names else Path(name).expanduser()


def run_curate_stage(stage: CurateStage, context) -> dict[str, Any]:
    dataset, unreadable = load_rows(input_path(stage, context))
    summary = curate(
        dataset,
        stage.steps,
        output_dir=context.stage_dir(stage.name),
        model_reference=context.model_reference,
        stage_dir=stage_dir_resolver(context),
        resources=context.resources_for(stage),
        cache_dir=context.recipe.cache_dir,
        rejected=unreadable,
    )
    print(f"curate: {summary['rows_out']} rows out, {summary['rows_rejected']} rejected "
          f"{summary['rejected_by_step']} -> {summary['output_dir']}", flush=True)
    return summary
