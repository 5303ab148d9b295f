"""Any OpenAI-compatible HTTP endpoint as a remote teacher.

Concurrency is bounded by a thread pool; 429 and 5xx answers and connection errors are retried
with exponential backoff (honouring Retry-After); each request has a timeout.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import httpx

from raypost.config import EngineConfig, SamplingConfig
from raypost.engines.base import Completion, Request, TokenLogprob, entropy_from_top_logprobs


class EndpointError(RuntimeError):
    pass


class OpenAIEngine:
    backend = "openai"

    def __init__(self, model: str, config: EngineConfig):
        if not config.base_url:
            raise ValueError("engine.base_url is required for the openai backend")
        self.model = model
        self.config = config
        key = os.environ.get(config.api_key_env, "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(
            base_url=config.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(config.timeout_s),
            limits=httpx.Limits(max_connections=config.max_concurrency),
        )
        self.pool = ThreadPoolExecutor(max_workers=config.max_concurrency)

    def generate(self, requests: Sequence[Request], sampling: SamplingConfig) -> list[list[Completion]]:
        return list(self.pool.map(lambda r: self._one(r, sampling), requests))

    def _one(self, request: Request, sampling: SamplingConfig) -> list[Completion]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": request.messages,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "n": sampling.n,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.stop:
            body["stop"] = sampling.stop
        top_k = sampling.logprobs if sampling.logprobs is not None else (5 if sampling.first_token_entropy else None)
        if top_k is not None:
            body.update(logprobs=True, top_logprobs=top_k)
        data = self._post("/chat/completions", body)
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens", 0))
        completions = []
        for choice in sorted(data.get("choices", []), key=lambda c: c.get("index", 0)):
            content = (choice.get("message") or {}).get("content") or ""
            token_logprobs = self._logprobs(choice)
            completion = Completion(
                text=content,
                completion_tokens=len(token_logprobs) if token_logprobs else self._completion_tokens(usage, sampling.n),
                prompt_tokens=prompt_tokens,
                finish_reason=choice.get("finish_reason"),
                logprobs=token_logprobs if sampling.logprobs is not None else None,
            )
            if sampling.first_token_entropy and token_logprobs:
                completion.first_token_entropy = entropy_from_top_logprobs([lp for _, lp in token_logprobs[0].top])
            completions.append(completion)
        if len(completions) != sampling.n:
            raise EndpointError(f"endpoint returned {len(completions)} choices, asked for {sampling.n}")
        return completions

    @staticmethod
    def _completion_tokens(usage: dict[str, Any], n: int) -> int:
        return int(usage.get("completion_tokens", 0)) // max(n, 1)

    @staticmethod
    def _logprobs(choice: dict[str, Any]) -> list[TokenLogprob] | None:
        content = (choice.get("logprobs") or {}).get("content")
        if not content:
            return None
        return [
            TokenLogprob(
                token=item["token"],
                logprob=float(item["logprob"]),
                top=[(t["token"], float(t["logprob"])) for t in item.get("top_logprobs", [])],
            )
            for item in content
        ]

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        delay = 0.5
        for attempt in range(self.config.max_retries + 1):
            last = attempt == self.config.max_retries
            try:
                response = self.client.post(path, json=body)
            except (httpx.TransportError, httpx.TimeoutException) as error:
                if last:
                    raise EndpointError(f"{self.config.base_url}{path}: {type(error).__name__}: {error}") from None
                time.sleep(delay * (1 + random.random()))
                delay *= 2
                continue
            if response.status_code == 200:
                return response.json()
            if response.status_code == 429 or response.status_code >= 500:
                if last:
                    break
                retry_after = response.headers.get("retry-after")
                wait = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else delay
                time.sleep(min(wait, 30.0) * (1 + 0.25 * random.random()))
                delay *= 2
                continue
            raise EndpointError(f"{self.config.base_url}{path}: HTTP {response.status_code}: {response.text[:300]}")
        raise EndpointError(
            f"{self.config.base_url}{path}: HTTP {response.status_code} after {self.config.max_retries} retries"
        )

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()
