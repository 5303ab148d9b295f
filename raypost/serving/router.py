"""The HTTP ingress for transformers-backed models: OpenAI routes, auth, dispatch by `model`.

Every request is checked here (key, JSON, types, model name) before it reaches a model
replica, and every failure becomes an OpenAI-shaped JSON error: a bad request costs one
response, never a replica.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from raypost.serving.auth import check_authorization, resolve_key
from raypost.serving.protocol import APIError, parse_request, sse

logger = logging.getLogger("ray.serve")
app = FastAPI(title="raypost OpenAI-compatible API")


def _error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(app)
class OpenAIRouter:
    def __init__(self, models: dict[str, DeploymentHandle], api_key: str | None = None, api_key_env: str | None = None):
        self.models = models
        self.api_key = resolve_key(api_key, api_key_env)
        self.created = int(time.time())

    def _authorize(self, request: Request) -> None:
        check_authorization(request.headers.get("authorization"), self.api_key)

    def _handle(self, model: str) -> DeploymentHandle:
        if model not in self.models:
            raise APIError(
                404, f"the model {model!r} does not exist; served: {', '.join(sorted(self.models))}",
                param="model", code="model_not_found",
            )
        return self.models[model]

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "models": sorted(self.models)}

    @app.get("/v1/models")
    async def list_models(self, request: Request):
        try:
            self._authorize(request)
        except APIError as error:
            return _error_response(error)
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "raypost"} for name in sorted(self.models)]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model}")
    async def get_model(self, model: str, request: Request):
        try:
            self._authorize(request)
            self._handle(model)
        except APIError as error:
            return _error_response(error)
        return {"id": model, "object": "model", "created": self.created, "owned_by": "raypost"}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._dispatch(request, "chat")

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._dispatch(request, "completion")

    async def _dispatch(self, request: Request, kind: str):
        try:
            self._authorize(request)
            parsed = parse_request(await request.body(), kind)
            handle = self._handle(parsed.model)
            body = parsed.model_dump(mode="json", exclude_unset=True)
            if parsed.stream:
                return await self._stream(handle, kind, body)
            result = await handle.generate.remote(kind, body)
            return JSONResponse(result["body"], status_code=result["status"])
        except APIError as error:
            return _error_response(error)
        except Exception as error:  # a replica failure is the server's fault, reported as such
            logger.exception("request failed")
            return _error_response(APIError(500, f"internal error: {type(error).__name__}: {error}", "server_error"))

    async def _stream(self, handle: DeploymentHandle, kind: str, body: dict[str, Any]):
        chunks = handle.options(stream=True).stream.remote(kind, body)
        head = await chunks.__anext__()
        if head["status"] != 200:
            return JSONResponse(head["body"], status_code=head["status"])

        async def events():
            try:
                async for chunk in chunks:
                    yield sse(chunk)
            except Exception as error:
                # Headers are gone already: the error travels as a last event, as OpenAI does.
                logger.exception("stream failed")
                yield sse(APIError(500, f"internal error: {type(error).__name__}: {error}", "server_error").body())
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

