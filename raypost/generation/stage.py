"""The `generate` recipe stage: a thin wrapper over `generate()`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raypost import records
from raypost.generation.config import GenerateStage, InputConfig
from raypost.generation.pipeline import generate


def load_input(input_config: InputConfig, context) -> records.LoadedPrompts:
    """Prompt rows from a file, or from an earlier stage's Parquet output (already in schema)."""
    if input_config.stage is not None:
        path = context.stage_output(input_config.stage)
        fmt = records.PromptFormat(prompt_field="messages", id_field="id", reference_field="reference")
    else:
        path = Path(input_config.path)
        fmt = records.PromptFormat(
            prompt_field=input_config.prompt_field,
            id_field=input_config.id_field,
            reference_field=input_config.reference_field,
            system_prompt=input_config.system_prompt,
        )
    loaded = records.load_prompts(path, fmt)
    if input_config.limit is not None:
        loaded.rows = loaded.rows[: input_config.limit]
    return loaded


def run_generate_stage(stage: GenerateStage, context) -> dict[str, Any]:
    loaded = load_input(stage.input, context)
    engine = stage.engine
    if engine.tokenizer:  # a name from `models` (e.g. the student) or a model reference
        engine = engine.model_copy(update={"tokenizer": context.model_reference(engine.tokenizer)})
    summary = generate(
        loaded.rows,
        model=context.model_reference(stage.model),
        output_dir=context.stage_dir(stage.name),
        engine=engine,
        sampling=stage.sampling,
        resources=context.resources_for(stage),
        cache_dir=context.recipe.cache_dir,
        rejected=loaded.rejected,
        source=str(stage.input.path or stage.input.stage),
    )
    print(summary.line(), flush=True)
    return summary.as_dict()
