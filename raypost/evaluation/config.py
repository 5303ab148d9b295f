"""Config of the `eval` recipe stage: which models, which benchmarks, with what settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from raypost.config import EngineConfig, Resources, SamplingConfig, StrictModel, existing_data_path

BenchmarkName = Literal["gsm8k", "arith", "mbpp", "humaneval", "mmlu_math"]


class BenchmarkSpec(StrictModel):
    """One benchmark and its settings; a bare name in the recipe means all defaults."""

    name: BenchmarkName
    data_path: str | None = Field(None, description="standard-format file or dir; default: the repo's / shared data")
    limit: int | None = Field(None, ge=1, description="evaluate a subset of this many items, drawn with `seed`")
    seed: int = 0
    n: int = Field(1, ge=1, description="samples per item (pass@k needs n >= k)")
    k: list[int] = Field(default_factory=lambda: [1])
    shots: int | None = Field(None, ge=0, description="default: gsm8k 4, mbpp 3, mmlu_math 5, humaneval 0")
    shots_path: str | None = Field(None, description="exemplar file; never the evaluated items")
    prompt_style: Literal["auto", "chat", "completion"] = "auto"
    method: Literal["generate", "loglik"] = Field("generate", description="mmlu_math: loglik scores A-D in one pass")
    split: str = Field("test", description="mbpp: test (ids 11-510), validation, train, prompt or all")
    subjects: list[str] | None = Field(None, description="mmlu_math: default the three mathematics subjects")
    timeout_s: float = Field(10.0, gt=0, description="per program, code benchmarks")
    sampling: SamplingConfig | None = Field(None, description="default: the stage's, else greedy")

    @field_validator("k")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError("k must be a non-empty list of integers >= 1")
        return value

    @field_validator("data_path", "shots_path")
    @classmethod
    def _exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        return existing_data_path(value, info)


class EvalStage(StrictModel):
    kind: Literal["eval"]
    name: str = "eval"
    models: list[str] = Field(
        default_factory=lambda: ["student"],
        description="names from `models`, model references, or `stage:<name>` (a train/merge stage's model)",
        min_length=1,
    )
    benchmarks: list[BenchmarkSpec] = Field(min_length=1, description="a name, or a mapping with settings")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig | None = None
    resources: Resources | None = Field(None, description="default: the recipe's resources")
    one_engine: Literal["auto"] | bool = Field(
        "auto", description="evaluate every model on one engine, loading each model's weights into it in place "
        "(models of one architecture and tokenizer): auto = with vLLM, one engine actor and no tensor parallelism, where a "
        "start-up costs more than the generation; true = also with transformers; false = an engine per model")

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _bare_names(cls, value):
        return [{"name": b} if isinstance(b, str) else b for b in value] if isinstance(value, list) else value

    def benchmark_specs(self) -> list[BenchmarkSpec]:
        return list(self.benchmarks)
