"""Answers taken from the dataset's own gold solutions, counted like teacher calls.

For budgeted simulations and tests: a closed-loop controller can "spend" teacher budget on
items without running a model. Token counts are whitespace tokens.
"""

from __future__ import annotations

from typing import Sequence

from raypost.config import SamplingConfig
from raypost.engines.base import Completion, Request


class MissingReference(ValueError):
    pass


class ReferenceEngine:
    backend = "reference"

    def __init__(self, model: str = "reference"):
        self.model = model
        self.calls = 0

    def generate(self, requests: Sequence[Request], sampling: SamplingConfig) -> list[list[Completion]]:
        results = []
        for request in requests:
            if request.reference is None:
                raise MissingReference(f"row {request.id}: no reference answer for the reference engine")
            self.calls += 1
            prompt_tokens = sum(len(m["content"].split()) for m in request.messages)
            words = request.reference.split()
            text = " ".join(words[: sampling.max_tokens]) if len(words) > sampling.max_tokens else request.reference
            finish = "length" if len(words) > sampling.max_tokens else "stop"
            results.append(
                [Completion(text=text, completion_tokens=min(len(words), sampling.max_tokens),
                            prompt_tokens=prompt_tokens, finish_reason=finish)
                 for _ in range(sampling.n)]
            )
        return results

    def close(self) -> None:
        pass
