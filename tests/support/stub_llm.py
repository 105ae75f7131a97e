"""A local OpenAI-compatible chat-completions server for tests: scripted failures, recorded requests.

with stub_llm_server() as llm:
    llm.fail_with(429, 503)          # the next two requests fail, then replies succeed
    monkeypatch.setenv("SIGNALBOX_LLM_BASE_URL", llm.base_url)
    ...
    assert llm.requests[-1].headers["authorization"] == "Bearer sk-test"
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.support.http_stub import JsonReplyHandler, serving

STUB_MODEL = "stub-model"


@dataclass
class StubReply:
    """One scripted reply; ``body`` bytes are sent as they are, a dict is sent as JSON."""

    status: int = 200
    body: bytes | dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_seconds: float = 0.0


@dataclass
class RecordedRequest:
    """A request the stub received; header names are lower-cased."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


class StubLLM:
    """The server's script and its record of what it was sent."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.usage = {"prompt_tokens": 11, "completion_tokens": 7}
        self._replies: deque[StubReply] = deque()
        self._lock = threading.Lock()
        self.base_url = ""

    def fail_with(self, *statuses: int) -> None:
        """The next requests get these error statuses, in order; later ones succeed."""
        for status in statuses:
            self.queue(StubReply(status=status, body={"error": {"message": f"stub {status}"}}))

    def queue(self, reply: StubReply) -> None:
        with self._lock:
            self._replies.append(reply)

    def record(self, request: RecordedRequest) -> StubReply | None:
        with self._lock:
            self.requests.append(request)
            return self._replies.popleft() if self._replies else None

    def completion(self, request_body: Any) -> dict[str, Any]:
        """A successful reply that echoes the last message, so tests can see what was sent."""
        sent = request_body if isinstance(request_body, dict) else {}
        messages = sent.get("messages") or [{}]
        last = messages[-1].get("content", "")
        return {
            "id": f"chatcmpl-stub-{len(self.requests)}",
            "object": "chat.completion",
            "created": 0,
            "model": sent.get("model") or STUB_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"stub reply to: {last}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {**self.usage, "total_tokens": sum(self.usage.values())},
        }


def _handler_for(stub: StubLLM) -> type[BaseHTTPRequestHandler]:
    class ChatCompletionsHandler(JsonReplyHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                body: Any = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            headers = {name.lower(): value for name, value in self.headers.items()}
            reply = stub.record(RecordedRequest("POST", self.path, headers, body))
            if reply is None:
                if not self.path.endswith("/chat/completions"):
                    reply = StubReply(404, {"error": {"message": "not found"}})
                else:
                    reply = StubReply(200, stub.completion(body))
            if reply.delay_seconds:
                time.sleep(reply.delay_seconds)
            self._send(reply)

        def _send(self, reply: StubReply) -> None:
            if isinstance(reply.body, bytes):
                payload = reply.body
            else:
                payload = json.dumps(reply.body if reply.body is not None else {}).encode()
            self.send_json(reply.status, payload, reply.headers)

    return ChatCompletionsHandler


@contextmanager
def stub_llm_server() -> Iterator[StubLLM]:
    """Serve a :class:`StubLLM` on 127.0.0.1 (a free port) for the duration of the block."""
    stub = StubLLM()
    with serving(_handler_for(stub), "stub-llm") as port:
        stub.base_url = f"http://127.0.0.1:{port}/v1"
        yield stub
