"""One Serve deployment per model on raypost's transformers engine (no vLLM needed).

Non-streaming chat goes through `TransformersEngine.generate`, with concurrent requests
gathered into one batch by `serve.batch` (that is where the throughput comes from on CPU).
Streaming and raw-text completions run the engine's model directly with a
TextIteratorStreamer, one request at a time. A lock keeps one `generate` on the model at a
time so batches and streams do not fight over the cores.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, AsyncIterator

from ray import serve

from raypost.config import EngineConfig, SamplingConfig
from raypost.engines.base import Completion, Request
from raypost.engines.chat import render_prompt
from raypost.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_response,
    completion_response,
    context_error,
    new_id,
    stream_chunk,
    usage,
)


@serve.deployment(health_check_period_s=10, health_check_timeout_s=60)
class TransformersModelServer:
    def __init__(self, model: str, max_model_len: int | None = None, dtype: str = "auto", cache_dir: str | None = None,
                 max_batch_size: int = 16, default_max_tokens: int = 256):
        from raypost.engines import build_engine

        self.engine = build_engine(
            model,
            EngineConfig(backend="transformers", max_model_len=max_model_len, dtype=dtype, batch_size=max_batch_size),
            cache_dir,
        )
        self.tokenizer = self.engine.tokenizer
        self.default_max_tokens = default_max_tokens
        self._lock = threading.Lock()
        self._chat_batch.set_max_batch_size(max_batch_size)

    def card(self) -> dict[str, Any]:
        return {"max_model_len": int(self.engine.max_model_len)}

    # -- request checks -------------------------------------------------------------------

    def _prompt_ids(self, kind: str, request) -> list[int]:
        text = render_prompt(self.tokenizer, request.plain_messages()) if kind == "chat" else request.prompt
        return self.tokenizer(text, add_special_tokens=kind != "chat")["input_ids"]

    def _max_tokens(self, prompt_tokens: int, request) -> int:
        limit = int(self.engine.max_model_len)
        requested = request.requested_max_tokens()
        if requested is None:
            if prompt_tokens >= limit:
                raise context_error(prompt_tokens, 1, limit)
            return min(self.default_max_tokens, limit - prompt_tokens)
        if prompt_tokens + requested > limit:
            raise context_error(prompt_tokens, requested, limit)
        return requested

    @staticmethod
    def _parse(kind: str, body: dict[str, Any]):
        return (ChatCompletionRequest if kind == "chat" else CompletionRequest).model_validate(body)

    # -- non-streaming ---------------------------------------------------------------------

    async def generate(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """{"status": 200, "body": response} or {"status": 4xx, "body": OpenAI error}."""
        try:
            request = self._parse(kind, body)
            prompt_ids = self._prompt_ids(kind, request)
            sampling = request.sampling(self._max_tokens(len(prompt_ids), request))
            if kind == "chat":
                completions = await self._chat_batch((request.plain_messages(), sampling))
                return {"status": 200, "body": chat_response(request.model, completions, len(prompt_ids))}
            completions = await asyncio.to_thread(self._generate_ids, prompt_ids, sampling)
            return {"status": 200, "body": completion_response(request.model, completions, len(prompt_ids))}
        except APIError as error:
            return {"status": error.status, "body": error.body()}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _chat_batch(self, items: list[tuple[list[dict[str, str]], SamplingConfig]]) -> list[list[Completion]]:
        # One engine call per distinct sampling setting; identical settings (the common case
        # with many clients of one app) share a batch.
        groups: dict[str, list[int]] = {}
        for index, (_, sampling) in enumerate(items):
            groups.setdefault(sampling.model_dump_json(), []).append(index)
        results: list[list[Completion]] = [[] for _ in items]
        for indices in groups.values():
            sampling = items[indices[0]][1]
            requests = [Request(id=str(i), messages=items[i][0]) for i in indices]
            outputs = await asyncio.to_thread(self._engine_generate, requests, sampling)
            for i, output in zip(indices, outputs):
                results[i] = output
        return results

    def _engine_generate(self, requests: list[Request], sampling: SamplingConfig) -> list[list[Completion]]:
        with self._lock:
            return self.engine.generate(requests, sampling)

    def _generate_ids(self, prompt_ids: list[int], sampling: SamplingConfig, streamer=None, cancel: threading.Event | None = None) -> list[Completion]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return bool(cancel and cancel.is_set())

        engine = self.engine
        input_ids = torch.tensor([prompt_ids], device=engine.device)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_tokens,
            num_return_sequences=sampling.n,
            pad_token_id=self.tokenizer.pad_token_id,
            attention_mask=torch.ones_like(input_ids),
            stopping_criteria=StoppingCriteriaList([Cancelled()]),
            streamer=streamer,
        )
        kwargs.update(engine.sampling_kwargs(sampling))
        with self._lock, torch.inference_mode():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            sequences = engine.hf_model.generate(input_ids=input_ids, **kwargs)[:, len(prompt_ids):]
        eos_ids = engine._eos_ids()
        completions = []
        for row in sequences.tolist():
            length, finish = engine._cut(row, eos_ids, sampling.max_tokens)
            text = self.tokenizer.decode(row[:length], skip_special_tokens=True)
            finish = engine._apply_stop(text, sampling.stop, finish)
            completions.append(Completion(engine._truncate_at_stop(text, sampling.stop), length, len(prompt_ids), finish))
        return completions

    # -- streaming -------------------------------------------------------------------------

    async def stream(self, kind: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """First item: {"status": 200} or {"status": 4xx, "body": error}; then OpenAI chunks."""
        try:
            request = self._parse(kind, body)
            if request.n != 1:
                raise APIError(400, "n > 1 is not supported with stream=true", param="n")
            prompt_ids = self._prompt_ids(kind, request)
            sampling = request.sampling(self._max_tokens(len(prompt_ids), request))
        except APIError as error:
            yield {"status": error.status, "body": error.body()}
            return
        yield {"status": 200}

        from transformers import AsyncTextIteratorStreamer

        streamer = AsyncTextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()

        def run() -> list[Completion]:
            try:
                return self._generate_ids(prompt_ids, sampling, streamer, cancel)
            except BaseException:
                streamer.end()
                raise

        task = asyncio.ensure_future(asyncio.to_thread(run))
        stream_id, created = new_id("chatcmpl" if kind == "chat" else "cmpl"), int(time.time())
        # Hold back a possible stop string's prefix until it is known not to be one.
        hold = max((len(s) for s in sampling.stop), default=1) - 1
        text, sent = "", 0
        try:
            if kind == "chat":
                yield stream_chunk(kind, stream_id, request.model, created, "", None, first=True)
            async for piece in streamer:
                text += piece
                cut = min((text.find(s) for s in sampling.stop if s in text), default=-1)
                end = cut if cut >= 0 else max(sent, len(text) - hold)
                if end > sent:
                    yield stream_chunk(kind, stream_id, request.model, created, text[sent:end], None)
                    sent = end
                if cut >= 0:
                    break
            completions = await task
            final = completions[0].text
            if len(final) > sent:
                yield stream_chunk(kind, stream_id, request.model, created, final[sent:], None)
            yield stream_chunk(kind, stream_id, request.model, created, None, completions[0].finish_reason or "stop")
            if (request.stream_options or {}).get("include_usage"):
                chunk = stream_chunk(kind, stream_id, request.model, created, None, None)
                chunk["choices"] = []
                chunk["usage"] = usage(len(prompt_ids), completions[0].completion_tokens)
                yield chunk
        finally:
            # A client that hangs up stops the generation instead of leaving it running.
            cancel.set()
