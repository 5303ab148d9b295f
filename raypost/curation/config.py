"""Config of the `curate` stage: an input and a list of steps, each with its settings."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator

from raypost.config import EngineConfig, Resources, SamplingConfig, StrictModel
from raypost.schema import ROUTING_SIGNALS

# The answer-only prompt of arXiv 2506.21220, for the student's first-token entropy.
DEFAULT_ANSWER_PROMPT = "{question}\n\nAnswer with the final answer only, no explanation."


class DedupStep(StrictModel):
    step: Literal["dedup"]
    field: Literal["prompt", "response"] = "prompt"
    exact: bool = True
    near: bool = True
    threshold: float = Field(0.8, gt=0, le=1, description="estimated Jaccard similarity that makes a near-duplicate")
    num_perm: int = Field(128, ge=16, le=1024)
    shingle: Literal["char", "word"] = "char"
    shingle_size: int = Field(5, ge=1, le=32)


class DiversityStep(StrictModel):
    step: Literal["diversity"]
    budget: int = Field(ge=1, description="prompts to keep")
    n_clusters: int = Field(8, ge=1)
    embedder: Literal["minilm", "tfidf"] = "minilm"
    seed: int = 0


class VerifyStep(StrictModel):
    step: Literal["verify"]
    kind: Literal["math", "code"] = "math"
    response_field: str = "response"
    reference_field: str = "reference"
    drop_failed: bool = False


class TeacherCoTConfig(StrictModel):
    """Where hard prompts' chain of thought comes from (see raypost.curation.sources.ResponseSource)."""

    source: Literal["input", "stage", "generate"] = "input"
    stage: str | None = Field(None, description="for source: stage, an earlier stage's name (or a directory)")
    model: str = "teacher"
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_tokens=256))

    @model_validator(mode="after")
    def _stage_named(self) -> "TeacherCoTConfig":
        if self.source == "stage" and not self.stage:
            raise ValueError("source: stage needs `stage`")
        return self


class EntropyRouteStep(StrictModel):
    step: Literal["entropy_route"]
    model: str = Field("student", description="the student whose entropy ranks difficulty")
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(backend="transformers"),
                                 description="always run with the transformers backend: exact full-vocabulary entropy")
    answer_prompt: str = DEFAULT_ANSWER_PROMPT
    answer_max_tokens: int = Field(16, ge=1, description="tokens of the student's answer kept to check it")
    signal: Literal[ROUTING_SIGNALS] = Field(
        "first_token", description="first_token: entropy of the first token of an answer-only reply (the paper); "
                                   "max_cot_entropy / mean_cot_entropy / loss: from the student's own greedy chain of "
                                   "thought (one pass measures all three)")
    cot_max_tokens: int = Field(256, ge=1, description="CoT signals: the student's chain of thought, at most this long")
    low_quantile: float = Field(0.25, ge=0, le=1)
    high_quantile: float = Field(0.75, ge=0, le=1)
    teacher: TeacherCoTConfig = Field(default_factory=TeacherCoTConfig)
    short_answer_template: str = "#### {answer}"
    require_verified_cot: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> "EntropyRouteStep":
        if self.low_quantile > self.high_quantile:
            raise ValueError("low_quantile must not exceed high_quantile")
        if "{question}" not in self.answer_prompt:
            raise ValueError("answer_prompt must contain {question}")
        return self


class CandidateConfig(StrictModel):
    name: str
    source: Literal["reference", "input", "stage", "generate"]
    stage: str | None = None
    model: str | None = None
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_tokens=256))

    @model_validator(mode="after")
    def _complete(self) -> "CandidateConfig":
        if self.source == "stage" and not self.stage:
            raise ValueError("source: stage needs `stage`")
        if self.source == "generate" and not self.model:
            raise ValueError("source: generate needs `model`")
        return self


class SelectStep(StrictModel):
    step: Literal["select"]
    candidates: list[CandidateConfig] = Field(default_factory=lambda: [
        CandidateConfig(name="reference", source="reference"),
        CandidateConfig(name="teacher", source="input"),
        CandidateConfig(name="student", source="generate", model="student"),
    ])
    scorer: Literal["perplexity", "judge", "none"] = "perplexity"
    scorer_model: str = "teacher"
    scorer_engine: EngineConfig = Field(default_factory=EngineConfig)
    verify_kind: Literal["math", "code"] = "math"


class WriteStep(StrictModel):
    step: Literal["write"]
    formats: list[Literal["sft", "kto", "preference"]] = Field(default_factory=lambda: ["sft", "kto", "preference"])
    sft_from: Literal["auto", "target", "best", "response"] = "auto"
    kto_from: Literal["auto", "select", "verified"] = "auto"


def is_pattern(value: str) -> bool:
    """A URI or a glob: read as files by Ray Data, not looked up as a stage or a path."""
    return "://" in value or any(c in value for c in "*?[")


CurationStep = Annotated[Union[DedupStep, DiversityStep, VerifyStep, EntropyRouteStep, SelectStep, WriteStep],
                         Field(discriminator="step")]


class CurateStage(StrictModel):
    kind: Literal["curate"]
    name: str = "curate"
    input: str = Field(description="an earlier stage's name (its Parquet output), or rows: a file, a directory, "
                                   "a glob or a URI (s3://, gs://, any pyarrow/fsspec filesystem)")
    steps: list[CurationStep] = Field(min_length=1)
    resources: Resources | None = Field(None, description="default: the recipe's resources")

    @field_validator("input")
    @classmethod
    def _pattern_matches(cls, value: str, info: ValidationInfo) -> str:
        """A URI or glob must match something when the recipe loads (a stage name or a path is
        checked with the recipe's other references)."""
        from raypost.generation.config import _existing_pattern

        return _existing_pattern(value, info) if is_pattern(value) else value
