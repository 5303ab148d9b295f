"""Config of the merge stage, and the argument checks it shares with the Python API (no torch
here: a recipe loads without it)."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from raypost.config import StrictModel

MergeMethod = Literal["linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear"]
METHODS = get_args(MergeMethod)
NEEDS_BASE = ("task_arithmetic", "ties", "dare_ties", "dare_linear")


def check_merge_arguments(method: str, n_models: int, weights: list[float] | None, has_base: bool,
                          t: float, density: float) -> None:
    """Argument errors shared by the Python API and the recipe stage (raises ValueError)."""
    if method not in METHODS:
        raise ValueError(f"method: unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if weights is not None and len(weights) != n_models:
        raise ValueError(f"weights: {len(weights)} weights for {n_models} models; give one weight per model")
    if method == "linear" and has_base:
        raise ValueError("base_model: linear merging has no base model; list every model to average in models")
    if method == "slerp" and weights is not None:
        raise ValueError("weights: slerp takes t (0 = base_model or the first model, 1 = the other), not weights")
    if method in NEEDS_BASE and not has_base:
        raise ValueError(f"base_model: method {method!r} merges task vectors (model - base) and needs base_model")
    if method == "linear" and n_models < 2:
        raise ValueError("models: linear merging needs two or more models")
    if method == "slerp" and n_models not in ((1, 2) if has_base else (2,)):
        raise ValueError("models: slerp interpolates between exactly two models")
    if method in NEEDS_BASE and n_models < 1:
        raise ValueError(f"models: {method} needs at least one model besides base_model")
    if not 0 <= t <= 1:
        raise ValueError(f"t: must be within [0, 1] (got {t})")
    if not 0 < density <= 1:
        raise ValueError(f"density: must be within (0, 1] (got {density})")


class MergeStage(StrictModel):
    """Fuse checkpoints into `<output_dir>/<name>/model`.

    A model is a name from the recipe's `models` block, a model reference (local dir, .gguf,
    packaged:NAME, hub id), or `stage:<name>`: the checkpoint an earlier stage exported.
    """

    kind: Literal["merge"]
    name: str = "merge"
    method: MergeMethod = "linear"
    models: list[str] = Field(min_length=1, description="models to merge (names, references or stage:<name>)")
    weights: list[float] | None = Field(None, description="one per model; default 1.0 each")
    base_model: str | None = Field(None, description="task_arithmetic/ties/dare: the base; slerp: the t=0 end")
    t: float = Field(0.5, ge=0, le=1, description="slerp: 0 gives the base, 1 the other model")
    density: float = Field(0.5, gt=0, le=1, description="ties/dare: fraction of each task vector kept")
    normalize: bool | None = Field(None, description="divide by the sum of weights; default: mergekit's per method")
    rescale: bool | None = Field(None, description="rescale kept entries to the task vector's L1 norm (DARE default)")
    seed: int = Field(0, description="dare: seed of the random drop masks")
    dtype: str | None = Field(None, description="output dtype (float32, bfloat16, float16); default: the inputs'")
    max_shard_size: int | str = "5GB"

    @model_validator(mode="after")
    def _arguments(self) -> "MergeStage":
        check_merge_arguments(self.method, len(self.models), self.weights, self.base_model is not None, self.t, self.density)
        return self
