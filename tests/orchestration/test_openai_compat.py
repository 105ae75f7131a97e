"""The OpenAI-compatible chat agent against a local stub server: usage, auth and error classes."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from orchestration.agents.base import AgentContext
from orchestration.agents.openai_compat import ENDPOINT_DEFAULT_MODEL, ChatCompletionAgent
from orchestration.errors import ContractViolation, PermanentError, TransientError
from tests.support.stub_llm import StubLLM, StubReply, stub_llm_server


@pytest.fixture
def llm(monkeypatch: pytest.MonkeyPatch) -> Iterator[StubLLM]:
    with stub_llm_server() as stub:
        monkeypatch.setenv("SIGNALBOX_LLM_BASE_URL", stub.base_url)
        monkeypatch.setenv("SIGNALBOX_LLM_MODEL", "test-model")
        monkeypatch.delenv("SIGNALBOX_LLM_API_KEY", raising=False)
        monkeypatch.delenv("SIGNALBOX_LLM_TIMEOUT", raising=False)
        yield stub


def call(
    max_tokens: int | None = None, **fields: object
) -> tuple[ChatCompletionAgent.Output, AgentContext]:
    agent = ChatCompletionAgent()
    ctx = AgentContext.for_test()
    ctx.max_tokens = max_tokens
    output = agent.run(agent.Input(**fields), ctx)
    return output, ctx


def test_success_returns_the_reply_and_captures_usage(llm: StubLLM) -> None:
    llm.usage = {"prompt_tokens": 42, "completion_tokens": 9}

    output, ctx = call(prompt="Say hello", temperature=0.2)

    assert output.content == "stub reply to: Say hello"
    assert output.model == "test-model"
    assert output.finish_reason == "stop"
    assert ctx.usage.prompt_tokens == 42
    assert ctx.usage.completion_tokens == 9
    assert ctx.usage.model == "test-model"
    sent = llm.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.body == {
        "model": "test-model",
        "messages": [{"role": "user", "content": "Say hello"}],
        "temperature": 0.2,
        "max_tokens": ChatCompletionAgent.max_tokens,  # no ceiling in force: its own bound
    }


def test_messages_are_sent_in_order_before_the_prompt(llm: StubLLM) -> None:
    call(messages=[{"role": "system", "content": "Be brief."}], prompt="Hi")

    assert llm.requests[-1].body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]


def test_api_key_is_sent_as_a_bearer_header(llm: StubLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNALBOX_LLM_API_KEY", "sk-test-123")

    call(prompt="Hi")

    assert llm.requests[-1].headers["authorization"] == "Bearer sk-test-123"


def test_no_authorization_header_without_a_key(llm: StubLLM) -> None:
    call(prompt="Hi")

    assert "authorization" not in llm.requests[-1].headers


@pytest.mark.parametrize("status", [429, 500, 503])
def test_rate_limit_and_server_errors_are_transient(llm: StubLLM, status: int) -> None:
    llm.fail_with(status)

    with pytest.raises(TransientError) as raised:
        call(prompt="Hi")

    assert raised.value.detail["status"] == status


def test_a_retry_after_a_transient_error_succeeds(llm: StubLLM) -> None:
    llm.fail_with(429)
    with pytest.raises(TransientError):
        call(prompt="Hi")

    output, _ = call(prompt="Hi")

    assert output.content == "stub reply to: Hi"
    assert len(llm.requests) == 2


@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_are_permanent(llm: StubLLM, status: int) -> None:
    llm.fail_with(status)

    with pytest.raises(PermanentError) as raised:
        call(prompt="Hi")

    assert raised.value.detail["status"] == status


def test_error_details_never_contain_the_api_key(
    llm: StubLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIGNALBOX_LLM_API_KEY", "sk-secret-456")
    llm.fail_with(401)

    with pytest.raises(PermanentError) as raised:
        call(prompt="Hi")

    assert "sk-secret-456" not in repr(raised.value.as_dict())


@pytest.mark.parametrize(
    "body",
    [
        b'{"choices": [{"message": {"role": "assistant", "content": "cut o',
        b"not json at all",
        b'{"object": "chat.completion"}',
        b'{"choices": []}',
        b'{"choices": [{"message": {"role": "assistant", "content": null}}]}',
        b'{"choices": [{"message": {"content": "ok"}}], "usage": {"prompt_tokens": "many"}}',
    ],
    ids=["truncated", "not-json", "no-choices", "empty-choices", "null-content", "bad-usage"],
)
def test_malformed_bodies_are_contract_violations(llm: StubLLM, body: bytes) -> None:
    llm.queue(StubReply(status=200, body=body))

    with pytest.raises(ContractViolation):
        call(prompt="Hi")


def test_missing_base_url_is_permanent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIGNALBOX_LLM_BASE_URL", raising=False)

    with pytest.raises(PermanentError, match="SIGNALBOX_LLM_BASE_URL"):
        call(prompt="Hi")


def test_slow_endpoint_times_out_as_transient(
    llm: StubLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIGNALBOX_LLM_TIMEOUT", "0.2")
    llm.queue(StubReply(status=200, body=llm.completion({}), delay_seconds=1.0))

    with pytest.raises(TransientError, match="timed out"):
        call(prompt="Hi")


def test_unreachable_endpoint_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    # A port that was free a moment ago: nothing listens there, so the connection is refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("SIGNALBOX_LLM_BASE_URL", f"http://127.0.0.1:{port}/v1")

    with pytest.raises(TransientError):
        call(prompt="Hi")


def test_invalid_timeout_setting_is_permanent(
    llm: StubLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIGNALBOX_LLM_TIMEOUT", "soon")

    with pytest.raises(PermanentError, match="SIGNALBOX_LLM_TIMEOUT"):
        call(prompt="Hi")

    assert llm.requests == []


def test_input_needs_messages_or_a_prompt() -> None:
    with pytest.raises(ValidationError):
        ChatCompletionAgent.Input()


def test_the_request_asks_for_no_more_tokens_than_the_reservation_covers(llm: StubLLM) -> None:
    call(max_tokens=300, prompt="Hi")

    assert llm.requests[-1].body["max_tokens"] == 300


def test_the_agent_is_priced_as_the_model_it_asks_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNALBOX_LLM_MODEL", "gpt-4o-mini")
    assert ChatCompletionAgent().call_model() == "gpt-4o-mini"
    # The server's own default model is still a model: priced by that name, or refused.
    monkeypatch.delenv("SIGNALBOX_LLM_MODEL")
    assert ChatCompletionAgent().call_model() == ENDPOINT_DEFAULT_MODEL


def test_the_input_estimate_bounds_the_messages_bytes() -> None:
    agent = ChatCompletionAgent()
    short = agent.Input(prompt="Hi")
    long = agent.Input(messages=[{"role": "system", "content": "Be brief."}], prompt="é" * 1000)

    assert agent.input_tokens_estimate(short) == 2 + 4
    assert agent.input_tokens_estimate(long) == (9 + 4) + (2000 + 4)  # "é" is two bytes
