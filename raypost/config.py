"""Typed recipe config, validated once at the edge.

A recipe is YAML mirrored by these pydantic models. `load_recipe` applies `a.b=value`
overrides, validates, and turns every failure into one `RecipeError` that names the file,
the field path and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator


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


def _format_location(location: tuple[Any, ...], stage_kinds: set[str]) -> str:
    parts: list[str] = []
    for i, item in enumerate(location):
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif i > 0 and location[i - 1] == "stages" or (
            # pydantic puts a discriminated union's tag into the path: drop it
            i > 0 and isinstance(location[i - 1], int) and item in stage_kinds
        ):
            if item in stage_kinds:
                continue
            parts.append(f".{item}")
        else:
            parts.append(f".{item}" if parts else str(item))
    return "".join(parts) or "(top level)"


def format_validation_error(source: str, error: ValidationError, stage_kinds: set[str]) -> str:
    lines = []
    for item in error.errors():
        message = item["msg"]
        if not item["loc"] and item["type"] == "value_error":
            # a recipe-wide check names its own field paths, one problem per line
            lines.extend(f"{source}: {line}" for line in message.removeprefix("Value error, ").splitlines())
            continue
        where = _format_location(tuple(item["loc"]), stage_kinds)
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "field required"
        got = item.get("input")
        got_text = "" if item["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{source}: {where}: {message}{got_text}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    if not key:
        raise RecipeError(f"override {text!r}: empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_override(data: dict[str, Any], path: list[str], value: Any, source: str) -> None:
    """Set data[a][b]... = value. In `stages`, an element is addressed by index or by name."""
    node: Any = data
    for depth, key in enumerate(path[:-1]):
        # Copy each node on the way down: a YAML anchor shares one object between places, and
        # an override names one place.
        if isinstance(node, list):
            index = _list_index(node, key, path, source)
            node[index] = _shallow_copy(node[index])
            node = node[index]
        elif isinstance(node, dict):
            node[key] = _shallow_copy(node.get(key, {}))
            node = node[key]
        else:
            raise RecipeError(f"{source}: override {'.'.join(path)}: {'.'.join(path[:depth])} is not a mapping")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, path, source)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"{source}: override {'.'.join(path)}: parent is not a mapping")


def _shallow_copy(node: Any) -> Any:
    return dict(node) if isinstance(node, dict) else list(node) if isinstance(node, list) else node


def _list_index(node: list[Any], key: str, path: list[str], source: str) -> int:
    if key.isdigit() and int(key) < len(node):
        return int(key)
    for i, item in enumerate(node):
        if isinstance(item, dict) and item.get("name", item.get("kind")) == key:
            return i
    raise RecipeError(f"{source}: override {'.'.join(path)}: no list element {key!r}")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: recipe file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise RecipeError(f"{p}: {where}: invalid YAML: {getattr(error, 'problem', error)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: the recipe must be a YAML mapping")
    return data


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), schema=None):
    """Read, override and validate a recipe (`schema`: another top-level model, e.g. a loop's).
    Raises RecipeError with a one-line-per-problem message."""
    from raypost.recipe import Recipe, stage_kinds

    data = read_yaml(path)
    if schema is None and isinstance(data, dict) and "loop" in data and "stages" not in data:
        from raypost.loop.config import LoopRecipe

        schema = LoopRecipe   # a loop recipe: `raypost loop FILE`
    schema = schema or Recipe
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value, str(path))
    try:
        recipe = schema.model_validate(data, context={"recipe_path": Path(path)})
    except ValidationError as error:
        raise RecipeError(format_validation_error(str(path), error, stage_kinds())) from None
    recipe.source = Path(path)
    return recipe


def resolve_data_path(value: str, base: Path | None) -> Path:
    """Relative data paths are looked up in the working directory, then beside the recipe."""
    p = Path(os.path.expanduser(value))
    if p.is_absolute() or p.exists() or base is None:
        return p
    beside = base.parent / p
    return beside if beside.exists() else p


def existing_data_path(value: str | None, info) -> str | None:
    """Field validator body for data paths: resolved as above, and it must exist."""
    if value is None:
        return value
    resolved = resolve_data_path(value, (info.context or {}).get("recipe_path"))
    if not resolved.exists():
        raise ValueError(f"path does not exist: {value}")
    return str(resolved)
