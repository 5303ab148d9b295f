"""Config of the generate stage (and the prompt input block other stages reuse)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from raypost.config import EngineConfig, Resources, SamplingConfig, StrictModel, existing_data_path


class InputConfig(StrictModel):
    """Where a stage's rows come from: files (a path, a directory, a glob, or a URI of any
    filesystem pyarrow or fsspec can open, e.g. s3://bucket/prompts/*.jsonl), or the output of an
    earlier stage by name."""

    path: str | None = None
    stage: str | None = None
    prompt_field: str = "prompt"
    id_field: str | None = None
    reference_field: str | None = None
    system_prompt: str | None = None
    limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> "InputConfig":
        if (self.path is None) == (self.stage is None):
            raise ValueError("give exactly one of `path` or `stage`")
        return self

    @field_validator("path")
    @classmethod
    def _exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if "://" in value or any(c in value for c in "*?["):
            return _existing_pattern(value, info)
        return existing_data_path(value, info)


def _existing_pattern(value: str, info: ValidationInfo) -> str:
    """A URI or glob must match something now: the recipe fails when it loads, not mid-run."""
    from raypost.generation.sources import resolve_inputs
    from raypost.records import DataError

    candidates = [value]
    recipe_path = (info.context or {}).get("recipe_path")
    if "://" not in value and not Path(value).is_absolute() and recipe_path:
        candidates.append(str(Path(recipe_path).parent / value))
    error = None
    for candidate in candidates:
        try:
            resolve_inputs(candidate)
            return candidate
        except DataError as e:
            error = error or e
    raise ValueError(str(error))


class GenerateStage(StrictModel):
    kind: Literal["generate"]
    name: str = "generate"
    model: str = Field("teacher", description="a name from `models` or a model reference")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    input: InputConfig
    resources: Resources | None = Field(None, description="default: the recipe's resources")
