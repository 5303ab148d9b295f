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

Rejected rows (any stage): the input row's fields as JSON text plus
  source: str              file (and line) or stage the row came from
  reason: str              why it was set aside
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
