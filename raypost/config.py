"""The leaf types of a recipe: resources, engine, sampling, models, and what every recipe file
has. Each stage's own config lives with its stage; the recipe that holds the stages, and
reading a file (YAML, `a.b=value` overrides, one `RecipeError` naming the file, the field path
and what was expected), live in `raypost/recipe.py`. Nothing here imports the rest of raypost.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator


class RecipeError(ValueError):
    """An invalid recipe: the message names the file, the field and what was expected."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Resources(StrictModel):
    """Resources for engine actors or training workers.

    The same recipe scales by changing these, not code: on GPUs set gpus_per_actor and
    tensor_parallel_size; on CPUs cpus_per_actor.
    """

    concurrency: int = Field(1, ge=1, description="number of engine actors (or replicas)")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    tensor_parallel_size: int = Field(1, ge=1)


EngineBackend = Literal["auto", "vllm", "transformers", "openai", "reference", "procedural"]


class EngineConfig(StrictModel):
    """Which engine serves a model. `auto` picks vLLM when importable, else transformers."""

    backend: EngineBackend = "auto"
    max_model_len: int | None = Field(None, ge=16, description="context length; default: the model's own")
    dtype: str = "auto"
    batch_size: int = Field(16, ge=1, description="prompts per engine call")
    cpu_threads: int | None = Field(None, ge=1, description="transformers on CPU: torch threads; default: the "
                                    "actor's CPUs (Ray gives a 1-CPU actor one thread)")
    # openai backend
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(5, ge=0)
    # vllm backend: passed through to vllm.LLM / vLLMEngineProcessorConfig.engine_kwargs
    vllm_kwargs: dict[str, Any] = Field(default_factory=dict)
    # procedural backend (a simulated teacher for raypost.tasks families)
    tokenizer: str | None = Field(None, description="procedural: a model (name or reference) whose tokenizer "
                                                    "counts tokens; default whitespace words")
    error_rate: float = Field(0.0, ge=0, le=1, description="procedural: share of answers with a wrong step")

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value


class SamplingConfig(StrictModel):
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    n: int = Field(1, ge=1, description="samples per prompt")
    seed: int | None = 0
    stop: list[str] = Field(default_factory=list)
    logprobs: int | None = Field(None, ge=0, le=20, description="keep per-token top-k logprobs")
    first_token_entropy: bool = False
    token_entropies: bool = Field(False, description="transformers: the exact entropy of every generated token")


class ModelsConfig(StrictModel):
    teacher: str | None = None
    student: str | None = None
    extra: dict[str, str] = Field(default_factory=dict, description="more named models")

    def lookup(self, name_or_ref: str) -> str:
        """A stage's `model:` is either a name from this block or a model reference itself."""
        if name_or_ref in ("teacher", "student"):
            value = getattr(self, name_or_ref)
            if value is None:
                raise RecipeError(f"models.{name_or_ref} is not set")
            return value
        return self.extra.get(name_or_ref, name_or_ref)


class RecipeFile(StrictModel):
    """What every recipe file has, whatever it runs (stages, or a loop): its name, where it writes,
    its models, and the file it was read from."""

    name: str
    output_dir: str = Field("runs/{name}", description="everything it writes goes under this directory")
    cache_dir: str | None = Field(None, description="model cache; default ~/.cache/raypost or $RAYPOST_CACHE")
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    _source: Path | None = PrivateAttr(None)

    @property
    def source(self) -> Path | None:
        return self._source

    @source.setter
    def source(self, value: Path | None) -> None:
        self._source = value

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name)).expanduser()


def resolve_data_path(value: str, base: Path | None) -> Path:
    """Relative data paths are looked up in the working directory, then beside the recipe."""
    p = Path(os.path.expanduser(value))
    if p.is_absolute() or p.exists() or base is None:
        return p
    beside = base.parent / p
    return beside if beside.exists() else p


def existing_data_path(value: str | None, info) -> str | None:
    """Field validator body for data paths: resolved as above, and it must exist. Absolute and
    normalized: the same file named from another working directory, or beside a recipe given by
    another path, is the same setting (a stage that reads it stays up to date)."""
    if value is None:
        return value
    resolved = resolve_data_path(value, (info.context or {}).get("recipe_path"))
    if not resolved.exists():
        raise ValueError(f"path does not exist: {value}")
    return str(resolved.resolve())
