"""API-key checks shared by both backends (the transformers router and the vLLM ingress)."""

from __future__ import annotations

import hmac
import json
import os

from raypost.serving.protocol import APIError

# Routes that load balancers and Kubernetes probe without credentials.
OPEN_PATHS = ("/health", "/-/healthz", "/-/routes")


def resolve_key(api_key: str | None, api_key_env: str | None) -> str | None:
    """The replica's own environment wins: on a cluster the key lives in a secret there."""
    return (os.environ.get(api_key_env) if api_key_env else None) or api_key


def check_authorization(header: str | None, api_key: str | None) -> None:
    """Raise a 401 APIError unless `header` is `Bearer <api_key>` (or no key is configured)."""
    if not api_key:
        return
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error", code="invalid_api_key")
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "incorrect API key", "authentication_error", code="invalid_api_key")


class APIKeyMiddleware:
    """ASGI middleware for apps raypost does not write itself (ray.serve.llm's ingress)."""

    def __init__(self, app, api_key: str | None = None, api_key_env: str | None = None):
        self.app = app
        self.api_key = resolve_key(api_key, api_key_env)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.api_key or scope["path"].rstrip("/").endswith(OPEN_PATHS):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            check_authorization(headers.get("authorization"), self.api_key)
        except APIError as error:
            body = json.dumps(error.body()).encode()
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        return await self.app(scope, receive, send)
