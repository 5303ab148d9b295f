"""Config of a closed loop (`raypost loop RECIPE`): pool, student, teacher, budget, selection.

A loop recipe is a YAML file with `name`, `output_dir`, `models` like any recipe and a `loop:`
section mirrored by `LoopConfig`. What cannot work is refused when the file loads (exit 2, with
the field path): a budget below one request, a strategy that needs gold answers on a pool without
them, a teacher that cannot write new problems asked to rewrite.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from raypost.config import EngineConfig, RecipeFile, Resources, SamplingConfig, StrictModel, existing_data_path
from raypost.tasks.arith import SYSTEM_PROMPT, parse_levels
from raypost.training.config import TrackingBlock, TrainConfig

# Strategies that rank by the student's own answer, by the gold answer, by the teacher's grade of
# the student's answer, by where a seed lies among the others, or by nothing.
STRATEGIES = ("loss_self", "loss_gold", "first_token_entropy", "max_cot_entropy", "margin", "judge", "kcenter",
              "random", "static")
NEEDS_GOLD = {"loss_gold"}
# Engines that only replay gold answers: they cannot write a new problem from a seed, grade an
# answer, or vote on one.
CANNOT_REWRITE = {"reference"}


class PoolSynth(StrictModel):
    family: Literal["arith"] = "arith"
    n: int = Field(ge=1)
    levels: str = "1-4"
    seed: int = 0
    distractors: float = Field(0.3, ge=0)

    @field_validator("levels")
    @classmethod
    def _levels(cls, value: str) -> str:
        parse_levels(value)
        return value


class PoolConfig(StrictModel):
    """Seed questions: a GSM8K-format JSONL (`question`, `answer`, optional group column), an
    MBPP file (`format: mbpp`: tasks with their tests, checked in the sandbox), or a `synth` spec of
    the testbed."""

    path: str | None = None
    synth: PoolSynth | None = None
    format: Literal["gsm8k", "mbpp"] = Field("gsm8k", description="gsm8k: question + gold answer; mbpp: "
                                             "mbpp.jsonl or sanitized-mbpp.json, each task with its tests")
    split: Literal["all", "prompt", "test", "validation", "train"] = Field(
        "all", description="mbpp: the task-id split of Austin et al. (train 601-974, test 11-510, ...)")
    question_field: str = "question"
    answer_field: str | None = Field("answer", description="gold answers (ending '#### N'); null: none")
    group_by: str | None = Field("level", description="column that names a row's group (quotas, per-group report)")
    system_prompt: str | None = SYSTEM_PROMPT

    _path = field_validator("path")(existing_data_path)

    @model_validator(mode="after")
    def _one_source(self) -> "PoolConfig":
        if (self.path is None) == (self.synth is None):
            raise ValueError("give exactly one of `path` or `synth`")
        if self.format == "mbpp":
            if self.synth is not None:
                raise ValueError("format mbpp reads a file: give `path`, not `synth`")
            if self.system_prompt == SYSTEM_PROMPT:   # the testbed's math instruction does not fit code
                self.system_prompt = None
        return self

    @property
    def has_gold(self) -> bool:
        """Gold solutions: the testbed's, a gsm8k file's answer field, MBPP's reference code."""
        return self.format == "mbpp" or self.synth is not None or self.answer_field is not None


class StudentConfig(StrictModel):
    model: str = Field("student", description="a name from `models` or a model reference")
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(backend="transformers"))
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_tokens=256))
    # Fractional CPUs: the student engine sits idle while the trainer runs, and on one small
    # machine both must fit at once (engine.cpu_threads lets its forward passes use every core).
    resources: Resources = Field(default_factory=lambda: Resources(cpus_per_actor=0.5))


class VoteConfig(StrictModel):
    """Majority vote on each written problem (arXiv 2512.00884 keeps a new question when the
    teacher's own answers agree): the teacher answers the new question `samples` times and the
    problem is kept when at least `min_agree` of those answers match its written solution. Each
    vote is a teacher request in the ledger, within the budget."""

    samples: int = Field(3, ge=2)
    min_agree: int = Field(2, ge=1)
    temperature: float = Field(0.7, ge=0)

    @model_validator(mode="after")
    def _agree(self) -> "VoteConfig":
        if self.min_agree > self.samples:
            raise ValueError(f"min_agree {self.min_agree} is more than samples {self.samples}")
        return self


class TeacherConfig(StrictModel):
    model: str = Field("procedural:arith", description="a name from `models` or a model reference")
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(backend="procedural"))
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_tokens=320))
    mode: Literal["rewrite", "answer"] = Field(
        "rewrite", description="rewrite: write a new problem from each seed and solve it (the paper); "
                               "answer: answer the seed itself")
    resources: Resources = Field(default_factory=lambda: Resources(cpus_per_actor=0.25))
    vote: VoteConfig | None = Field(None, description="rewrite mode: keep a written problem when the teacher's "
                                                      "own answers to it agree (instead of the task's solver)")

    @model_validator(mode="after")
    def _can_rewrite(self) -> "TeacherConfig":
        if self.mode == "rewrite" and self.engine.backend in CANNOT_REWRITE:
            raise ValueError(f"engine.backend {self.engine.backend!r} only replays gold answers and cannot write "
                             "new problems: use mode: answer, or a model or the procedural teacher")
        if self.vote is not None and self.mode != "rewrite":
            raise ValueError("vote checks problems the teacher wrote: it needs mode: rewrite")
        return self

    @property
    def requests_per_seed(self) -> int:
        """A seed's request, plus one vote request per written problem."""
        return 1 + (self.sampling.n if self.vote is not None else 0)

    def worst_tokens(self, prompt_tokens: int, question_prompt_tokens: int) -> int:
        """The most one seed can cost: the request, and its vote (whose question is at most the
        request's whole answer, max_tokens, plus `question_prompt_tokens` of template)."""
        sampling = self.sampling
        worst = prompt_tokens + sampling.max_tokens * sampling.n
        if self.vote is not None:
            worst += sampling.n * (question_prompt_tokens + sampling.max_tokens + sampling.max_tokens * self.vote.samples)
        return worst


class BudgetConfig(StrictModel):
    """The teacher budget of the whole loop. Each limit given is a cap; the loop stops at the first.

    A request is sent only when its worst case (prompt tokens plus max_tokens per sample) still
    fits, so the totals never pass a cap."""

    requests: int | None = Field(None, ge=1)
    tokens: int | None = Field(None, ge=1, description="prompt + completion tokens")
    cost_usd: float | None = Field(None, gt=0)
    price_per_1k_tokens: float = Field(0.0, ge=0, description="USD per 1k teacher tokens (for cost_usd)")
    per_round: list[float] | None = Field(None, description="share of the budget per round (default even)")

    @model_validator(mode="after")
    def _some_cap(self) -> "BudgetConfig":
        if self.requests is None and self.tokens is None and self.cost_usd is None:
            raise ValueError("give at least one of requests, tokens, cost_usd")
        if self.cost_usd is not None and self.price_per_1k_tokens <= 0:
            raise ValueError("cost_usd needs price_per_1k_tokens > 0")
        if self.per_round is not None and (any(s < 0 for s in self.per_round) or sum(self.per_round) <= 0):
            raise ValueError("per_round: shares must be >= 0 and sum to more than 0")
        return self


class LearnabilityConfig(StrictModel):
    """Skip seeds that teach nothing now (arXiv 2512.00884's learnability filters): the student
    samples each seed `samples` times; seeds every sample solves, or none does, go last."""

    samples: int = Field(4, ge=2)
    temperature: float = Field(1.0, gt=0)
    skip: Literal["both", "solved", "unsolved"] = Field("both", description="solved: every sample right; "
                                                        "unsolved: none right")


class SelectionConfig(StrictModel):
    strategy: Literal[STRATEGIES] = "loss_self"
    reduce: Literal["mean", "sum"] = Field("mean", description="loss_self / loss_gold: mean or summed token loss")
    proportional: bool = Field(False, description="sample seeds in proportion to score instead of the top-m")
    skip_solved: bool = Field(False, description="learnability filter: skip seeds the student already answers "
                                                 "correctly (needs gold answers)")
    quota_by: str | None = Field(None, description="split each round's requests evenly over this group column")
    logprobs: int = Field(5, ge=1, le=20, description="top-k logprobs kept for entropy and margin")
    learnability: LearnabilityConfig | None = None
    embedder: Literal["minilm", "tfidf"] = Field("minilm", description="kcenter: question embeddings (MiniLM, "
                                                 "or TF-IDF where MiniLM is not installed)")


class EvalConfig(StrictModel):
    path: str = Field("data/arith/test.jsonl", description="held-out set, GSM8K format (or MBPP with format)")
    format: Literal["gsm8k", "mbpp"] = "gsm8k"
    split: Literal["all", "prompt", "test", "validation", "train"] = Field("all", description="mbpp task-id split")
    limit: int | None = Field(None, ge=1, description="first N items per group, in file order")
    group_by: str | None = "level"
    max_tokens: int = Field(256, ge=1)

    _path = field_validator("path")(existing_data_path)


class SplitConfig(StrictModel):
    """How a reasoning path becomes steps; the boundaries (character offsets) are kept as data."""

    by: Literal["line", "sentence", "regex"] = "line"
    pattern: str | None = Field(None, description="by: regex: a pattern that matches each step boundary")

    @model_validator(mode="after")
    def _pattern(self) -> "SplitConfig":
        import re

        if (self.by == "regex") != (self.pattern is not None):
            raise ValueError("give `pattern` exactly when by: regex")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as error:
                raise ValueError(f"pattern {self.pattern!r}: {error}") from None
        return self


class SipfConfig(StrictModel):
    """Self-iterative process feedback (arXiv 2412.08393): the student samples `n` paths per
    question; from each step's prefix a simulator completes `k` rollouts; a step is correct when
    more than `delta` of them reach the gold answer; a path scores the mean (or min) of its step
    values; pairs whose scores differ by at least `eta` train the student with ORPO."""

    n: int = Field(4, ge=2, description="paths sampled per question")
    temperature: float = Field(1.0, ge=0, description="1.0 for math, 0.7 for code (the paper)")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    # Outcome labels: math, the final answer against the gold one, paths deduplicated by
    # normalized text; code, the tests run in the sandbox, paths deduplicated by edit distance.
    verifier: Literal["math", "code"] = "math"
    dedup_distance: float = Field(0.1, ge=0, le=1, description="code: a path within this edit distance (share "
                                  "of its length) of a kept one is a duplicate")
    split: SplitConfig = Field(default_factory=SplitConfig)
    k: int = Field(4, ge=1, description="Monte-Carlo rollouts per step prefix")
    delta: float = Field(0.5, ge=0, le=1, description="a step is correct when more than delta of its rollouts are")
    simulator: Literal["student", "teacher"] = Field("student", description="who completes the rollouts: the "
                                                     "current student, or loop.teacher (a larger model)")
    rollout_max_tokens: int = Field(192, ge=1)
    reward: Literal["process", "outcome", "prm"] = Field(
        "process", description="process: Monte-Carlo step values; prm: a process reward model trained on those "
                               "values' labels scores the steps (the paper); outcome: pairs of a correct and a "
                               "wrong path, no rollouts (the ablation)")
    prm: TrainConfig | None = Field(None, description="reward prm: the process reward model's training (method "
                                                      "prm), from the base student's weights, on the labels so far")
    prm_holdout: float = Field(0.2, ge=0, lt=1, description="reward prm: share of questions whose steps only "
                                                             "measure the PRM (step accuracy, ROC AUC)")
    reduce: Literal["mean", "min"] = Field("mean", description="path score from its step values")
    eta: float = Field(0.3, ge=0, description="least score gap of a pair")
    pairs_per_question: int = Field(2, ge=1)
    questions_per_round: int | None = Field(None, ge=1, description="questions sampled each round (default: the pool)")
    warmup: TrainConfig | None = Field(None, description="SFT on gold solutions before round 1; "
                                                         "round 0 evaluates it (the SFT baseline)")
    # Warm-up on the very questions SIPF then samples teaches the student their answers: on the
    # testbed, 10 epochs over a 24-question pool left 32 distinct paths of 96 sampled, 29 right,
    # so few pairs to learn from. Questions of its own (never the pool's) avoid that.
    warmup_pool: PoolConfig | None = Field(None, description="the warm-up's own questions with gold answers "
                                                             "(default: the loop's pool)")

    @model_validator(mode="after")
    def _prm_method(self) -> "SipfConfig":
        if self.reward == "prm" and self.prm is None:
            self.prm = TrainConfig(method="prm")
        if self.prm is not None and self.prm.method != "prm":
            raise ValueError(f"prm trains a process reward model: method must be prm, not {self.prm.method!r}")
        return self

    @model_validator(mode="after")
    def _warmup_sft(self) -> "SipfConfig":
        if self.warmup is not None and self.warmup.method != "sft":
            raise ValueError("warmup trains on gold solutions: method must be sft")
        if self.warmup_pool is not None and self.warmup is None:
            raise ValueError("warmup_pool is given but warmup is not")
        if self.warmup_pool is not None and not self.warmup_pool.has_gold:
            raise ValueError("warmup_pool needs gold answers (answer_field is null)")
        return self


class LoopConfig(StrictModel):
    pool: PoolConfig
    mode: Literal["distill", "sipf"] = Field("distill", description="distill: the teacher answers where the "
                                             "student is weakest; sipf: the student's own paths, scored step by "
                                             "step, train it by preference")
    student: StudentConfig = Field(default_factory=StudentConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    budget: BudgetConfig | None = Field(None, description="distill: the teacher budget; sipf: an optional cap on "
                                                          "rollout requests/tokens")
    sipf: SipfConfig | None = None
    rounds: int = Field(3, ge=1)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    train_on: Literal["all", "new"] = Field("all", description="each round trains on all data so far, or the new")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingBlock = Field(default_factory=TrackingBlock, description="each round's record to "
                                    "TensorBoard or MLflow (dir default <output_dir>/tracking)")
    engines: Literal["persistent", "per_phase"] = Field(
        "persistent", description="persistent: engines stay up for the whole loop and take new weights in place; "
                                  "per_phase: each phase starts its own (the baseline bench/loop.py compares)")
    trainer: Literal["auto", "resident", "per_round"] = Field(
        "auto", description="resident: one training actor stays up for the whole loop (TRL imported once; "
                            "one worker, no DeepSpeed); per_round: a Ray Train run per round; auto: resident "
                            "with persistent engines where the train config allows it")
    seed: int = 0

    def resident_trainer(self) -> bool:
        """Whether rounds train on one actor that stays up (raypost.training.resident)."""
        from raypost.training.resident import supports

        if self.trainer == "auto":
            return self.engines == "persistent" and supports(self.train) is None
        return self.trainer == "resident"

    @model_validator(mode="after")
    def _consistent(self) -> "LoopConfig":
        if self.trainer == "resident":
            from raypost.training.resident import supports

            reason = supports(self.train)
            if reason is not None:
                raise ValueError(f"trainer: resident cannot run this train config: train.{reason}")
        if self.mode == "sipf":
            return self._sipf_consistent()
        if self.pool.format != "gsm8k":
            raise ValueError("pool.format mbpp: the distill loop checks answers against gold answers (and written "
                             "problems with the task's solver); code tasks run in mode sipf")
        if self.budget is None:
            raise ValueError("budget: the teacher budget is required (give at least one of requests, tokens, cost_usd)")
        if self.sipf is not None:
            raise ValueError("sipf: set mode: sipf to use it")
        selection = self.selection
        needs_gold = selection.strategy in NEEDS_GOLD or selection.skip_solved or selection.learnability
        if needs_gold and not self.pool.has_gold:
            what = ("skip_solved" if selection.skip_solved else "learnability" if selection.learnability
                    else f"strategy {selection.strategy!r}")
            raise ValueError(f"selection: {what} needs gold answers and pool.answer_field is null")
        if selection.strategy == "judge" and self.teacher.engine.backend in CANNOT_REWRITE:
            raise ValueError(f"selection.strategy judge: the teacher grades the student's answers, and engine.backend "
                             f"{self.teacher.engine.backend!r} cannot grade")
        if self.selection.strategy == "loss_gold" and self.student.engine.backend != "transformers":
            raise ValueError("selection.strategy loss_gold scores the gold answer with the student's own forward "
                             "pass: student.engine.backend must be transformers")
        if self.selection.quota_by is not None and self.selection.quota_by != self.pool.group_by:
            raise ValueError(f"selection.quota_by {self.selection.quota_by!r}: quotas are per pool group; set "
                             f"pool.group_by to it (now {self.pool.group_by!r})")
        if self.budget.per_round is not None and len(self.budget.per_round) != self.rounds:
            raise ValueError(f"budget.per_round has {len(self.budget.per_round)} shares for {self.rounds} rounds")
        if self.budget.requests is not None and self.budget.requests < self.teacher.requests_per_seed:
            raise ValueError(f"budget.requests {self.budget.requests} is below one teacher request and its "
                             f"vote ({self.teacher.requests_per_seed} requests)")
        worst = self.teacher.worst_tokens(0, 0)
        if self.budget.tokens is not None and self.budget.tokens < worst:
            vote = " + its vote" if self.teacher.vote else ""
            raise ValueError(f"budget.tokens {self.budget.tokens} is below one teacher request{vote} "
                             f"(max_tokens {self.teacher.sampling.max_tokens} x n {self.teacher.sampling.n}{vote})")
        if self.budget.cost_usd is not None and self.budget.cost_usd < worst / 1000 * self.budget.price_per_1k_tokens:
            raise ValueError(f"budget.cost_usd {self.budget.cost_usd} is below one teacher request")
        return self

    def _sipf_consistent(self) -> "LoopConfig":
        if self.sipf is None:
            self.sipf = SipfConfig()
        if self.engines != "persistent":
            raise ValueError("engines: per_phase is a baseline of the distill loop; mode sipf keeps its engines up")
        if self.sipf.verifier == "code" and self.pool.format != "mbpp":
            raise ValueError("sipf.verifier code runs each path against its task's tests: the pool needs them "
                             "(pool.format: mbpp)")
        if self.sipf.verifier == "math" and self.pool.format == "mbpp":
            raise ValueError("pool.format mbpp holds code tasks: set sipf.verifier: code")
        if not self.pool.has_gold:
            raise ValueError("mode sipf labels paths by their final answer: the pool needs gold answers "
                             "(pool.answer_field)")
        if self.train.method not in ("orpo", "dpo"):
            raise ValueError(f"mode sipf trains on preference pairs: train.method must be orpo or dpo, "
                             f"not {self.train.method!r}")
        worst = self.sipf.rollout_max_tokens * self.sipf.k
        if self.budget is not None and self.budget.tokens is not None and self.budget.tokens < worst:
            raise ValueError(f"budget.tokens {self.budget.tokens} is below one rollout request "
                             f"(rollout_max_tokens {self.sipf.rollout_max_tokens} x k {self.sipf.k})")
        return self

    def shares(self) -> list[float]:
        """Share of the budget for each round; the static baseline spends it all before training."""
        if self.selection.strategy == "static":
            return [1.0]
        shares = (self.budget.per_round if self.budget else None) or [1.0] * self.rounds
        total = sum(shares)
        return [s / total for s in shares]


class LoopRecipe(RecipeFile):
    loop: LoopConfig

    @model_validator(mode="after")
    def _models_named(self, info: ValidationInfo) -> "LoopRecipe":
        for role in ("student", "teacher"):
            reference = getattr(self.loop, role).model
            if reference in ("student", "teacher") and getattr(self.models, reference) is None:
                raise ValueError(f"loop.{role}.model: {reference!r} names models.{reference}, which is not set")
        return self

    def model(self, role: str) -> str:
        return self.models.lookup(getattr(self.loop, role).model)
