"""Config of the `synth` recipe stage: a procedural pool of prompts (raypost.tasks)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from raypost.config import StrictModel
from raypost.tasks.arith import SYSTEM_PROMPT, parse_levels


class SynthStage(StrictModel):
    kind: Literal["synth"]
    name: str = "synth"
    family: Literal["arith"] = "arith"
    n: int = Field(ge=1, description="items in the pool")
    levels: str = Field("1-4", description="difficulty levels, e.g. 1-4 or 1,3")
    seed: int = 0
    distractors: float = Field(0.3, ge=0, description="expected irrelevant sentences per problem")
    system_prompt: str | None = Field(SYSTEM_PROMPT, description="system message of each prompt row")

    @field_validator("levels")
    @classmethod
    def _levels(cls, value: str) -> str:
        parse_levels(value)
        return value
