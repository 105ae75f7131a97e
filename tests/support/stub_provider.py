"""A local HTTP provider for tool-registry tests: scripted replies, recorded requests, and
side effects counted by ``Idempotency-Key`` the way an idempotent API applies them.

with stub_provider_server("search-a") as stub:
    stub.reply_with(429, 429)              # the next two requests get 429, later ones succeed
    provider = HttpJsonProvider(name="search-a", url=stub.url)
    ...
    assert stub.count == 3 and stub.effects_applied == 1

Also here: the test capability's contracts, and the functions spawned worker-like processes run
(this module imports no Django models, so a spawned child can unpickle them before setup).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from pydantic import BaseModel

from orchestration.tools.providers import HttpJsonProvider
from orchestration.tools.registry import Capability, RetryPolicy
from tests.support.http_stub import JsonReplyHandler, serving


@dataclass
class StubReply:
    """One scripted reply. ``body`` None: a success body echoing the request (or an error body)."""

    status: int = 200
    body: dict[str, Any] | bytes | None = None
    delay_seconds: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    #: None: the effect is applied on a 2xx; True: applied even though an error is returned
    #: (the effect happened, the response was lost), False: never applied.
    applies_effect: bool | None = None
    #: The body repeats the request's headers and JSON (a provider that echoes what it got).
    echo_request: bool = False


@dataclass
class ReceivedCall:
    """A request the stub received; header names are lower-cased."""

    at: float
    path: str
    headers: dict[str, str]
    body: Any

    @property
    def idempotency_key(self) -> str:
        return self.headers.get("idempotency-key", "")


class StubProvider:
    """The server's script and its record of what it was sent and what it applied."""

    def __init__(self, name: str):
        self.name = name
        self.url = ""
        self.default = StubReply()
        self.requests: list[ReceivedCall] = []
        #: How many times each call's effect was applied, per Idempotency-Key ("" = no key).
        self.effects: Counter[str] = Counter()
        self._replies: deque[StubReply] = deque()
        self._lock = threading.Lock()

    def reply_with(self, *statuses: int, delay_seconds: float = 0.0) -> None:
        """The next requests get these statuses, in order; later ones get the default reply."""
        self.queue(*(StubReply(status=s, delay_seconds=delay_seconds) for s in statuses))

    def queue(self, *replies: StubReply) -> None:
        with self._lock:
            self._replies.extend(replies)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    @property
    def effects_applied(self) -> int:
        with self._lock:
            return sum(self.effects.values())

    def receive(self, call: ReceivedCall) -> StubReply:
        with self._lock:
            self.requests.append(call)
            reply = self._replies.popleft() if self._replies else self.default
            applies = (
                reply.applies_effect if reply.applies_effect is not None else reply.status < 300
            )
            key = call.idempotency_key
            # An idempotent API applies a keyed effect once, whatever it answers to a retry.
            if applies and (not key or key not in self.effects):
                self.effects[key] += 1
            return reply

    def body_for(self, reply: StubReply, call: ReceivedCall) -> bytes:
        if isinstance(reply.body, bytes):
            return reply.body
        if reply.body is not None:
            body: dict[str, Any] = reply.body
        elif reply.status < 300:
            body = {
                "served_by": self.name,
                "echo": call.body,
                "usage": {"total_tokens": 12, "cost_usd": 0.0012},
            }
        else:
            body = {"error": f"stub {reply.status}"}
        if reply.echo_request:
            body = {**body, "request_headers": call.headers, "request_body": call.body}
        return json.dumps(body).encode()


def _handler_for(stub: StubProvider) -> type[BaseHTTPRequestHandler]:
    class ProviderHandler(JsonReplyHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body: Any = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            headers = {name.lower(): value for name, value in self.headers.items()}
            call = ReceivedCall(time.time(), self.path, headers, body)
            reply = stub.receive(call)
            if reply.delay_seconds:
                time.sleep(reply.delay_seconds)
            payload = stub.body_for(reply, call)
            self.send_json(reply.status, payload, reply.headers)

    return ProviderHandler


@contextmanager
def stub_provider_server(name: str = "stub") -> Iterator[StubProvider]:
    """Serve a :class:`StubProvider` on 127.0.0.1 (a free port) for the duration of the block."""
    stub = StubProvider(name)
    with serving(_handler_for(stub), f"stub-{name}") as port:
        stub.url = f"http://127.0.0.1:{port}/call"
        yield stub


# --- the test capability ------------------------------------------------------------------------


class EchoParams(BaseModel):
    text: str
    #: Marked secret by the test capability: never recorded.
    card_number: str | None = None


class EchoResult(BaseModel):
    served_by: str
    echo: dict[str, Any]


def echo_capability(
    name: str,
    *providers: HttpJsonProvider,
    side_effects: bool = False,
    retry: RetryPolicy | None = None,
) -> Capability:
    """A capability served by stub providers, with ``card_number`` secret."""
    return Capability(
        name=name,
        Params=EchoParams,
        Result=EchoResult,
        providers=providers,
        side_effects=side_effects,
        secret_params=frozenset({"card_number"}),
        retry=retry
        or RetryPolicy(
            max_attempts=3, base_seconds=0.05, max_delay_seconds=1.0, time_budget_seconds=10
        ),
    )


#: Registered by name in tests (``settings.SIGNALBOX_CAPABILITIES``); its URL and key come from
#: the environment, as a deployment's would.
registered_echo = echo_capability(
    "test_echo",
    HttpJsonProvider(
        name="test-echo-primary",
        url_env="SIGNALBOX_TEST_ECHO_URL",
        api_key_env="SIGNALBOX_TEST_ECHO_KEY",
        secret_fields=frozenset({"session"}),
    ),
)
not_a_capability = {"name": "test_echo"}


# --- run in spawned processes (as separate workers would) ---------------------------------------


def _django_setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")
    import django

    django.setup()


def call_once_when_told(capability: Capability, params: dict[str, Any], go: Any, out: Any) -> None:
    """Wait for ``go``, call once, report ("ok", provider) or ("failed", last error code)."""
    _django_setup()
    from orchestration.tools.client import ToolCallFailed, ToolClient

    client = ToolClient()
    out.put(("ready", ""))
    go.wait(30)
    try:
        result = client.call(capability, params)
        out.put(("ok", result.served_by))  # type: ignore[attr-defined]
    except ToolCallFailed as exc:
        out.put(("failed", exc.detail["last_error"]["code"]))


def call_repeatedly_when_told(
    capability: Capability, params: dict[str, Any], go: Any, seconds: float, out: Any
) -> None:
    """Wait for ``go``, call for ``seconds``, report (successes, failures, finished at)."""
    _django_setup()
    from orchestration.tools.client import ToolCallFailed, ToolClient

    client = ToolClient()
    out.put(("ready", 0, 0, 0.0))
    go.wait(30)
    until = time.monotonic() + seconds
    succeeded = failed = 0
    while time.monotonic() < until:
        try:
            client.call(capability, params)
            succeeded += 1
        except ToolCallFailed:
            failed += 1
    out.put(("done", succeeded, failed, time.time()))


#: A side-effecting capability (a refund): every retry or re-claim carries the same key.
registered_effect = echo_capability(
    "test_effect",
    HttpJsonProvider(name="test-effect", url_env="SIGNALBOX_TEST_ECHO_URL"),
    side_effects=True,
)
