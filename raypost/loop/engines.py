"""Engines that stay up for the whole loop, as Ray actors.

A round needs the student (scoring the pool, then the eval set) and the teacher; starting an
engine per phase costs a vLLM start-up (50-90 s on these CPUs) each time. So each is one actor for
the loop's lifetime, and after each round's training the new student weights are loaded into the
running engine (`load_weights`): transformers copies them into the live module, vLLM reloads them
in every worker of the running engine (its in-place `reload_weights`), both in place; an engine without
an in-place path is rebuilt inside the same actor, which keeps the process but pays the engine
start-up again; `weight_sync.how` in the round record says which happened.
"""

from __future__ import annotations

import time
from typing import Sequence

import ray

from raypost.config import EngineConfig, Resources, SamplingConfig
from raypost.engines import build_engine
from raypost.engines.base import Completion, Request


class EngineActor:
    def __init__(self, model: str, config: EngineConfig, cache_dir: str | None, tokenizer_of: str | None = None):
        self.config = config
        self.cache_dir = cache_dir
        self.engine = build_engine(model, config, cache_dir)
        self._tokenizer = getattr(self.engine, "tokenizer", None)
        if self._tokenizer is None and tokenizer_of:
            from transformers import AutoTokenizer

            from raypost.models import resolve_model

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(tokenizer_of, cache_dir))

    def ready(self) -> str:
        return self.engine.backend

    def generate(self, requests: Sequence[Request], sampling: SamplingConfig) -> list[list[Completion] | str]:
        """Completions per request; a request the engine cannot answer is its error message (a
        failed row), the others still come back."""
        from raypost.engines import generate_each

        return generate_each(self.engine, requests, sampling)

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        """Prompt tokens with the engine's own tokenizer, else `tokenizer_of`'s (budget checks before a
        request is sent)."""
        from raypost.engines.chat import count_prompt_tokens

        if self._tokenizer is None:
            return sum(len(m["content"].split()) for m in messages)
        return count_prompt_tokens(self._tokenizer, messages)

    def count_tokens_many(self, conversations: list[list[dict[str, str]]]) -> list[int]:
        """One call for a batch: the budget check must not cost a round trip per request."""
        return [self.count_tokens(messages) for messages in conversations]

    def answer_losses(self, requests: Sequence[Request], answers: Sequence[str]) -> list[tuple[float, float]]:
        return self.engine.answer_losses(requests, answers)

    def load_weights(self, model_path: str) -> dict:
        started = time.perf_counter()
        if hasattr(self.engine, "load_weights"):
            self.engine.load_weights(model_path)
            how = "in place"
        else:
            self.engine.close()
            self.engine = build_engine(model_path, self.config, self.cache_dir)
            how = "engine rebuilt"
        return {"seconds": time.perf_counter() - started, "how": how}

    def close(self) -> None:
        self.engine.close()


def start_engine_actor(model: str, config: EngineConfig, resources: Resources, cache_dir: str | None,
                       tokenizer_of: str | None = None):
    remote = ray.remote(EngineActor).options(
        num_cpus=resources.cpus_per_actor, num_gpus=resources.gpus_per_actor,
        max_concurrency=1, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(resources.cpus_per_actor)))}})
    actor = remote.remote(model, config, cache_dir, tokenizer_of)
    ray.get(actor.ready.remote())
    return actor


def stop_engine_actor(actor) -> None:
    """Close the engine (vLLM ends its workers), then end the actor whatever close did."""
    try:
        ray.get(actor.close.remote(), timeout=60)
    except Exception:   # noqa: BLE001 - closing is best effort; the kill below is not
        pass
    ray.kill(actor)
