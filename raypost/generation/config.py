"""Config of the generate stage (and the prompt input block other stages reuse)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from raypost.config import EngineConfig, Resources, SamplingConfig, StrictModel, existing_data_path


class InputConfig(StrictModel):
    """Where a stage's rows come from: a file, or the output of an earlier stage by name."""

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
        return existing_data_path(value, info)


class GenerateStage(StrictModel):
    kind: Literal["generate"]
    name: str = "generate"
    model: str = Field("teacher", description="a name from `models` or a model reference")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    input: InputConfig
    resources: Resources | None = Field(None, description="default: the recipe's resources")
