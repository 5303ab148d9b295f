"""The one Engine interface. Callers never branch on the backend."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from raypost.config import SamplingConfig


@dataclass
class Request:
    """One prompt: chat messages, plus the dataset's gold answer for the reference engine."""

    id: str
    messages: list[dict[str, str]]
    reference: str | None = None


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)

    def as_record(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "logprob": self.logprob,
            "top": [{"token": t, "logprob": lp} for t, lp in self.top],
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "TokenLogprob":
        """The inverse of as_record (a stored generation row's logprobs)."""
        return cls(record["token"], record["logprob"], [(t["token"], t["logprob"]) for t in record.get("top") or []])


@dataclass
class Completion:
    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    # Shannon entropy (nats) of the first generated token's distribution: exact over the full
    # vocabulary for transformers; for vLLM and OpenAI, estimated from the top-k logprobs.
    first_token_entropy: float | None = None
    # transformers with sampling.token_entropies: every generated token's exact entropy (nats)
    token_entropies: list[float] | None = None


@runtime_checkable
class Engine(Protocol):
    backend: str
    model: str

    def generate(self, requests: Sequence[Request], sampling: SamplingConfig) -> list[list[Completion]]:
        """n completions (sampling.n) for each request, in request order."""
        ...

    def close(self) -> None:
        """Release the model and any processes or shared memory the backend holds."""
        ...


def row_error(error: BaseException) -> str:
    """A failed row's reason, the same text in every stage's `error` column and `rejected/`."""
    return f"{type(error).__name__}: {error}"


class EngineDead(RuntimeError):
    """The engine cannot answer anything any more: not a failed row but a failed run."""


def engine_dead(error: BaseException) -> bool:
    """vLLM's EngineDeadError (its engine core process is gone): by name, so that no backend
    needs vLLM installed to tell."""
    return isinstance(error, EngineDead) or any(c.__name__ == "EngineDeadError" for c in type(error).__mro__)


def generate_each(engine: Engine, requests: Sequence[Request], sampling: SamplingConfig) -> list[list[Completion] | str]:
    """`engine.generate`, where one request the engine cannot answer does not cost the others:
    the batch first, then (if it failed) request by request. A failed request comes back as its
    reason (`row_error`), in place. A dead engine raises `EngineDead`: every request would fail
    with it, and a run must stop (and resume later) instead of recording them as wrong answers."""
    try:
        return engine.generate(requests, sampling)
    except Exception as error:
        if engine_dead(error):
            raise EngineDead(row_error(error)) from error
        if len(requests) == 1:
            return [row_error(error)]
    results: list[list[Completion] | str] = []
    for request in requests:
        try:
            results.extend(engine.generate([request], sampling))
        except Exception as error:  # the row keeps its reason
            if engine_dead(error):
                raise EngineDead(row_error(error)) from error
            results.append(row_error(error))
    return results


def entropy_from_logits(logits) -> float:
    """Exact Shannon entropy (nats) of softmax(logits) over the full vocabulary."""
    import torch

    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return float(-(log_probs.exp() * log_probs).sum())


def entropy_from_top_logprobs(logprobs: Sequence[float]) -> float:
    """Entropy estimate from top-k logprobs: the listed tokens plus one bucket for the rest.

    An approximation (a lower bound when the tail is spread over many tokens); documented
    as such wherever vLLM or an OpenAI endpoint reports first-token entropy.
    """
    probs = [math.exp(lp) for lp in logprobs]
    total = sum(probs)
    entropy = -sum(p * math.log(p) for p in probs if p > 0)
    rest = 1.0 - total
    if rest > 1e-12:
        entropy -= rest * math.log(rest)
    return entropy
