"""An agent that calls any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, ...).

Configured at call time from the environment, so a deployment changes endpoint or model without a
code change: ``SIGNALBOX_LLM_BASE_URL`` (required), ``SIGNALBOX_LLM_MODEL``,
``SIGNALBOX_LLM_API_KEY`` (optional, never logged) and ``SIGNALBOX_LLM_TIMEOUT`` (seconds).

Under a cost ceiling the agent is priced as the model it asks for (``SIGNALBOX_LLM_MODEL``, or
``ENDPOINT_DEFAULT_MODEL`` when the server picks: a price table that lacks it fails the call
closed), its worst case counts its messages' bytes, and the request's ``max_tokens`` is what
the reservation covers.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import httpx
from pydantic import BaseModel, Field, model_validator

from orchestration.agents.base import Agent, AgentContext
from orchestration.errors import ContractViolation, PermanentError, TransientError

DEFAULT_TIMEOUT_SECONDS = 30.0
# How much of an error response to keep in the step's error detail; enough to read the reason.
ERROR_BODY_EXCERPT = 500
#: The name priced when ``SIGNALBOX_LLM_MODEL`` is unset and the server answers with its own model.
ENDPOINT_DEFAULT_MODEL = "endpoint-default"
# Byte-level tokenizers never make more tokens than a text has UTF-8 bytes; each message adds
# a few tokens of framing. The worst case, not the likely one: settling returns the rest.
TOKENS_PER_MESSAGE = 4


class ChatMessage(BaseModel):
    """One message of a chat-completions conversation."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatCompletionAgent(Agent):
    """Sends messages (or a single prompt) to a chat-completions endpoint and returns the reply."""

    name = "llm_chat"
    capability = "chat_completion"

    class Input(BaseModel):
        messages: list[ChatMessage] = Field(default_factory=list)
        prompt: str | None = None
        temperature: float | None = Field(default=None, ge=0, le=2)

        @model_validator(mode="after")
        def _has_messages_or_prompt(self) -> ChatCompletionAgent.Input:
            if not self.messages and not self.prompt:
                raise ValueError("give messages or a prompt")
            return self

    class Output(BaseModel):
        content: str
        model: str
        finish_reason: str

    def call_model(self) -> str:
        return _configured_model() or ENDPOINT_DEFAULT_MODEL

    def input_tokens_estimate(self, input: BaseModel) -> int:
        if not isinstance(input, ChatCompletionAgent.Input):
            return super().input_tokens_estimate(input)
        texts = [m.content for m in input.messages] + ([input.prompt] if input.prompt else [])
        return sum(len(text.encode()) + TOKENS_PER_MESSAGE for text in texts)

    def run(self, input: Input, ctx: AgentContext) -> Output:
        base_url = os.environ.get("SIGNALBOX_LLM_BASE_URL", "").strip().rstrip("/")
        if not base_url:
            raise PermanentError(
                "SIGNALBOX_LLM_BASE_URL is not set; point it at an OpenAI-compatible API, "
                "e.g. https://api.openai.com/v1"
            )
        model = _configured_model()
        url = f"{base_url}/chat/completions"
        body = self._request_body(input, model, ctx)
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get("SIGNALBOX_LLM_API_KEY", "").strip()
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        if ctx.trace_id:
            headers["X-Request-Id"] = ctx.trace_id

        try:
            response = httpx.post(url, json=body, headers=headers, timeout=_timeout_seconds())
        except httpx.TimeoutException as exc:
            raise TransientError(
                f"chat completion timed out: {exc.__class__.__name__}", detail={"url": url}
            ) from exc
        except httpx.TransportError as exc:
            raise TransientError(
                f"chat completion could not reach the endpoint: {exc.__class__.__name__}",
                detail={"url": url},
            ) from exc

        self._raise_for_status(response, url)
        return self._parse(response, model, ctx)

    def _request_body(self, input: Input, model: str, ctx: AgentContext) -> dict[str, Any]:
        messages = [message.model_dump() for message in input.messages]
        if input.prompt:
            messages.append({"role": "user", "content": input.prompt})
        body: dict[str, Any] = {"messages": messages}
        # Servers that host a single model accept a request without one.
        if model:
            body["model"] = model
        if input.temperature is not None:
            body["temperature"] = input.temperature
        # The reply may be no longer than the cost reservation covers (or, with no ceiling in
        # force, than this agent's own bound).
        body["max_tokens"] = ctx.max_tokens if ctx.max_tokens is not None else self.max_tokens
        return body

    def _raise_for_status(self, response: httpx.Response, url: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        detail: dict[str, Any] = {
            "url": url,
            "status": status,
            "body": response.text[:ERROR_BODY_EXCERPT],
        }
        if "retry-after" in response.headers:
            detail["retry_after"] = response.headers["retry-after"]
        # Timeouts, rate limits and server errors pass; a request the server refused stays refused.
        if status in (408, 429) or status >= 500:
            raise TransientError(f"chat completion endpoint returned {status}", detail=detail)
        raise PermanentError(
            f"chat completion endpoint refused the request ({status})", detail=detail
        )

    def _parse(self, response: httpx.Response, model: str, ctx: AgentContext) -> Output:
        try:
            payload = response.json()
            choice = payload["choices"][0]
            content = choice["message"]["content"]
            if not isinstance(content, str):
                raise TypeError("message content is not a string")
            usage = payload.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ContractViolation(
                "chat completion response is malformed or truncated",
                detail={"error": str(exc)[:200], "body": response.text[:ERROR_BODY_EXCERPT]},
            ) from exc
        used_model = str(payload.get("model") or model or "unknown")
        ctx.report_usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, model=used_model
        )
        return self.Output(
            content=content,
            model=used_model,
            finish_reason=str(choice.get("finish_reason") or "unknown"),
        )


def _configured_model() -> str:
    return os.environ.get("SIGNALBOX_LLM_MODEL", "").strip()


def _timeout_seconds() -> float:
    raw = os.environ.get("SIGNALBOX_LLM_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise PermanentError(
            f"SIGNALBOX_LLM_TIMEOUT must be a positive number of seconds, not {raw!r}"
        )
    return seconds
