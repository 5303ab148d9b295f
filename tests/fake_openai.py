"""A minimal OpenAI-compatible endpoint on a real local HTTP server (tests/conftest.py serves it
as the `fake_openai` fixture): flaky prompts fail once with 429/503, `always-broken` ones always
with 500, everything with 503 while `FakeOpenAI.down`; the rest are echoed ("echo PROMPT #i")
with logprobs."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible endpoint: fails the first request of each prompt with 429/503."""

    failures: dict[str, int] = {}
    down = False          # True: every request gets 503 (an outage)
    served = 0            # requests answered with 200
    lock = threading.Lock()
    seen_auth: list[str] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen_auth.append(self.headers.get("Authorization", ""))
        content = body["messages"][-1]["content"]
        with self.lock:
            count = self.failures.get(content, 0)
            self.failures[content] = count + 1
        if self.down:
            return self._send(503, {"error": {"message": "service unavailable"}})
        if "always-broken" in content:
            return self._send(500, {"error": {"message": "boom"}})
        if count == 0 and content.startswith("flaky"):
            return self._send(429 if content.endswith("1") else 503, {"error": {"message": "slow down"}},
                              {"Retry-After": "0"})
        choices = []
        for i in range(body.get("n", 1)):
            message = {"role": "assistant", "content": f"echo {content} #{i}"}
            choice = {"index": i, "message": message, "finish_reason": "stop"}
            if body.get("logprobs"):
                choice["logprobs"] = {"content": [
                    {"token": "echo", "logprob": math.log(0.5),
                     "top_logprobs": [{"token": "echo", "logprob": math.log(0.5)},
                                      {"token": "say", "logprob": math.log(0.25)}]}]}
            choices.append(choice)
        with self.lock:
            FakeOpenAI.served += 1
        self._send(200, {"choices": choices, "usage": {"prompt_tokens": 7, "completion_tokens": 3 * len(choices)}})

    def _send(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


def serve() -> tuple[ThreadingHTTPServer, str]:
    """Start the server on a free port; returns it and its /v1 base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeOpenAI.failures.clear()
    FakeOpenAI.seen_auth.clear()
    FakeOpenAI.down, FakeOpenAI.served = False, 0
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"
