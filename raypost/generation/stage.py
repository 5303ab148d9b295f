"""The `generate` recipe stage: a thin wrapper over `generate_files()`."""

from __future__ import annotations

from typing import Any

from raypost import console
from raypost import records
from raypost.generation.config import GenerateStage, InputConfig
from raypost.generation.pipeline import generate_files


def input_format(input_config: InputConfig) -> tuple[str, records.PromptFormat]:
    """The files of a stage's input and how their rows become prompts."""
    if input_config.stage is not None:
        return "", records.PromptFormat(prompt_field="messages", id_field="id", reference_field="reference")
    return input_config.path, records.PromptFormat(
        prompt_field=input_config.prompt_field,
        id_field=input_config.id_field,
        reference_field=input_config.reference_field,
        system_prompt=input_config.system_prompt,
    )


def run_generate_stage(stage: GenerateStage, context) -> dict[str, Any]:
    path, fmt = input_format(stage.input)
    if stage.input.stage is not None:
        path = str(context.stage_output(stage.input.stage))
    engine = stage.engine
    if engine.tokenizer:  # a name from `models` (e.g. the student) or a model reference
        engine = engine.model_copy(update={"tokenizer": context.model_reference(engine.tokenizer)})
    summary = generate_files(
        path, fmt,
        model=context.model_reference(stage.model),
        output_dir=context.stage_dir(stage.name),
        engine=engine,
        sampling=stage.sampling,
        resources=context.resources_for(stage),
        cache_dir=context.recipe.cache_dir,
        limit=stage.input.limit,
    )
    console.say(summary.line())
    return summary.as_dict()
