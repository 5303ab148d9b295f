"""The `curate` recipe stage: a thin wrapper over `curate()`."""

from __future__ import annotations

from typing import Any

from raypost import console
from raypost.curation.config import CurateStage, is_pattern
from raypost.curation.pipeline import curate, load_rows


def run_curate_stage(stage: CurateStage, context) -> dict[str, Any]:
    # `input` and the steps' `stage` fields name an earlier stage or a path; the recipe checked
    # both when it loaded
    dataset, unreadable = load_rows(stage.input if is_pattern(stage.input) else context.stage_output(stage.input))
    summary = curate(
        dataset,
        stage.steps,
        output_dir=context.stage_dir(stage.name),
        model_reference=context.model_reference,
        stage_dir=context.stage_output,
        resources=context.resources_for(stage),
        cache_dir=context.recipe.cache_dir,
        rejected=unreadable,
        # the stage directory is fresh when settings or inputs changed: what is in work/ was
        # paid for under these same ones (a crash or Ctrl-C), and is resumed, not bought again
        keep_work=True,
    )
    console.say(f"curate: {summary['rows_out']} rows out, {summary['rows_rejected']} rejected "
                f"{summary['rejected_by_step']} -> {summary['output_dir']}")
    return summary
