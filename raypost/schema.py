"""The one schema for records that flow between stages, stored as Parquet.

Every stage reads and writes these column names; change them here only.

Prompt rows (input to generation):
  id: str                  stable identifier, unique within a dataset
  messages: list[{role: str, content: str}]   the chat prompt
  reference: str | None    the dataset's gold answer/solution, when known

Generation rows (output of generation; one row per prompt and sample):
  id, messages, reference
  sample_index: int        0..n-1 for n samples per prompt
  response: str            the generated text
  prompt_tokens: int
  completion_tokens: int
  finish_reason: str | None
  logprobs: list[{token: str, logprob: float, top: list[{token: str, logprob: float}]}] | None
  first_token_entropy: float | None   nats, of the first generated token's distribution
  engine: str              backend name (vllm, transformers, openai, reference)
  model: str               model reference as given in the recipe

A row that a model could not answer or score (any actor stage: generation, scoring, judging,
evaluation) keeps its place with
  error: str | None        "ExceptionType: message" (engines.row_error); None when it worked
and is then set aside, or ranked last, by the stage that owns it.

Rejected rows (any stage): the input row's fields as JSON text plus
  source: str              file (and line) or stage the row came from
  reason: str              why it was set aside

Curation columns (added by curation steps, read by later steps and by the writers):
  verified, verify_reason                 verify: the checker's verdict and why
  entropy, entropy_normalized             entropy_route: the routing signal (first-token entropy by default)
  signals                                 entropy_route: every signal its scoring pass measured
  student_answer, student_correct
  difficulty, target, target_source       entropy_route: easy/medium/hard and the chosen target
  best, best_source, worst, worst_source, candidates    select: ranked candidate responses
  cluster                                 diversity: the row's cluster
"""

from __future__ import annotations

import pyarrow as pa

ID = "id"
MESSAGES = "messages"
REFERENCE = "reference"
SAMPLE_INDEX = "sample_index"
RESPONSE = "response"
PROMPT_TOKENS = "prompt_tokens"
COMPLETION_TOKENS = "completion_tokens"
FINISH_REASON = "finish_reason"
LOGPROBS = "logprobs"
FIRST_TOKEN_ENTROPY = "first_token_entropy"
ENGINE = "engine"
MODEL = "model"
ERROR = "error"

VERIFIED = "verified"
VERIFY_REASON = "verify_reason"
ENTROPY = "entropy"
ENTROPY_NORMALIZED = "entropy_normalized"
STUDENT_ANSWER = "student_answer"
STUDENT_CORRECT = "student_correct"
DIFFICULTY = "difficulty"
TARGET = "target"
TARGET_SOURCE = "target_source"
BEST = "best"
BEST_SOURCE = "best_source"
WORST = "worst"
WORST_SOURCE = "worst_source"
CANDIDATES = "candidates"
CLUSTER = "cluster"
SIGNALS = "signals"

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
TOP_LOGPROB_TYPE = pa.struct([("token", pa.string()), ("logprob", pa.float64())])
TOKEN_LOGPROB_TYPE = pa.struct(
    [("token", pa.string()), ("logprob", pa.float64()), ("top", pa.list_(TOP_LOGPROB_TYPE))]
)

PROMPT_SCHEMA = pa.schema(
    [
        (ID, pa.string()),
        (MESSAGES, pa.list_(MESSAGE_TYPE)),
        (REFERENCE, pa.string()),
    ]
)

GENERATION_SCHEMA = pa.schema(
    [
        (ID, pa.string()),
        (MESSAGES, pa.list_(MESSAGE_TYPE)),
        (REFERENCE, pa.string()),
        (SAMPLE_INDEX, pa.int32()),
        (RESPONSE, pa.string()),
        (PROMPT_TOKENS, pa.int32()),
        (COMPLETION_TOKENS, pa.int32()),
        (FINISH_REASON, pa.string()),
        (LOGPROBS, pa.list_(TOKEN_LOGPROB_TYPE)),
        (FIRST_TOKEN_ENTROPY, pa.float64()),
        (ENGINE, pa.string()),
        (MODEL, pa.string()),
    ]
)

REJECTED_SCHEMA = pa.schema(
    [
        (ID, pa.string()),
        ("row", pa.string()),
        ("source", pa.string()),
        ("reason", pa.string()),
    ]
)


# The columns each curation step adds, with their types (a step's output schema is its input's
# plus these).
VERIFY_COLUMNS = {VERIFIED: pa.bool_(), VERIFY_REASON: pa.string()}
# entropy_route's difficulty signals: the first token's entropy under an answer-only prompt, or,
# from the student's own greedy chain of thought, its most uncertain token, its mean token
# entropy, and its mean token loss
ROUTING_SIGNALS = ("first_token", "max_cot_entropy", "mean_cot_entropy", "loss")
SIGNALS_TYPE = pa.struct([(name, pa.float64()) for name in ROUTING_SIGNALS])
SCORE_COLUMNS = {
    ENTROPY: pa.float64(),
    ENTROPY_NORMALIZED: pa.float64(),
    SIGNALS: SIGNALS_TYPE,
    STUDENT_ANSWER: pa.string(),
    ERROR: pa.string(),
}
ROUTE_COLUMNS = {
    ENTROPY: pa.float64(),
    ENTROPY_NORMALIZED: pa.float64(),
    SIGNALS: SIGNALS_TYPE,
    STUDENT_ANSWER: pa.string(),
    STUDENT_CORRECT: pa.bool_(),
    DIFFICULTY: pa.string(),
    TARGET: pa.string(),
    TARGET_SOURCE: pa.string(),
}
SELECT_COLUMNS = {
    BEST: pa.string(),
    BEST_SOURCE: pa.string(),
    WORST: pa.string(),
    WORST_SOURCE: pa.string(),
    CANDIDATES: pa.list_(pa.struct([("source", pa.string()), ("text", pa.string()), (VERIFIED, pa.bool_()),
                                    ("score", pa.float64())])),
}
