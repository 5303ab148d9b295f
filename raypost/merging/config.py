"""Config of the merge stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raypost.config import StrictModel

MergeMethod = Literal["linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear"]


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
        from raypost.merging.merge import check_merge_arguments

        check_merge_arguments(self.method, len(self.models), self.weights, self.base_model is not None, self.t, self.density)
        return self
