"""The capability registry: explicit names, lazy imports, unknown names are errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestration.errors import PermanentError
from orchestration.tools import (
    Capability,
    FunctionProvider,
    HttpJsonProvider,
    UnknownCapability,
    capability_get,
    capability_list,
)
from orchestration.tools.registry import BUILTIN_CAPABILITIES, RetryPolicy
from tests.support.stub_provider import EchoParams, EchoResult, registered_echo

ECHO_PATH = "tests.support.stub_provider:registered_echo"


def _noop(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return {}


def _provider(name: str, priority: int = 100) -> FunctionProvider:
    return FunctionProvider(name=name, priority=priority, function=_noop)


def test_a_registered_name_gives_its_capability(settings: Any) -> None:
    settings.SIGNALBOX_CAPABILITIES = {"test_echo": ECHO_PATH}

    assert capability_get("test_echo") is registered_echo
    # Beside the built-in (demo) capabilities.
    assert [cap.name for cap in capability_list()] == sorted([*BUILTIN_CAPABILITIES, "test_echo"])


def test_an_unknown_name_is_a_permanent_error_with_a_stable_code(settings: Any) -> None:
    settings.SIGNALBOX_CAPABILITIES = {}

    with pytest.raises(UnknownCapability) as caught:
        capability_get("teleport")

    assert isinstance(caught.value, PermanentError)
    assert caught.value.code == "unknown_capability"
    assert caught.value.detail == {"capability": "teleport"}


def test_entries_are_imported_only_when_asked_for(settings: Any) -> None:
    settings.SIGNALBOX_CAPABILITIES = {
        "test_echo": ECHO_PATH,
        "broken": "tests.support.no_such_module:thing",
    }

    assert capability_get("test_echo") is registered_echo
    with pytest.raises(UnknownCapability, match="cannot import"):
        capability_get("broken")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("tests.support.stub_provider:not_a_capability", "is not a Capability"),
        ("tests.support.stub_provider:nothing_here", "cannot import"),
    ],
)
def test_an_entry_that_is_not_a_capability_is_refused(
    settings: Any, path: str, message: str
) -> None:
    settings.SIGNALBOX_CAPABILITIES = {"test_echo": path}

    with pytest.raises(UnknownCapability, match=message):
        capability_get("test_echo")


def test_a_capability_registered_under_another_name_is_refused(settings: Any) -> None:
    settings.SIGNALBOX_CAPABILITIES = {"web_search": ECHO_PATH}

    with pytest.raises(UnknownCapability, match="registered as 'web_search'"):
        capability_get("web_search")


def test_providers_are_tried_by_priority_then_declared_order() -> None:
    cap = Capability(
        "search",
        EchoParams,
        EchoResult,
        (_provider("backup", 20), _provider("first", 10), _provider("also-backup", 20)),
    )

    assert [p.name for p in cap.providers_in_order()] == ["first", "backup", "also-backup"]


@pytest.mark.parametrize(
    ("providers", "error"),
    [((), "has no providers"), ((_provider("a"), _provider("a")), "lists a provider twice")],
)
def test_a_capability_needs_distinct_providers(
    providers: tuple[FunctionProvider, ...], error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        Capability("search", EchoParams, EchoResult, providers)


def test_contracts_must_be_pydantic_models() -> None:
    with pytest.raises(TypeError):
        Capability("search", dict, EchoResult, (_provider("a"),))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["Upper", "with space", "{braces}", "", "a" * 101])
def test_provider_names_are_plain(name: str) -> None:
    with pytest.raises(ValueError):
        _provider(name)


def test_retry_policy_bounds_grow_to_their_cap() -> None:
    policy = RetryPolicy(base_seconds=0.5, max_delay_seconds=3)

    assert [policy.delay_bound(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3, 3]


def test_describe_shows_contracts_and_limits_but_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNALBOX_TEST_ECHO_KEY", "sk-live-do-not-show")
    monkeypatch.setenv("SIGNALBOX_TEST_ECHO_URL", "https://user:hunter22@api.example.com/echo")

    described = registered_echo.describe()

    text = json.dumps(described)
    assert "sk-live-do-not-show" not in text
    assert "hunter22" not in text
    assert described["providers"][0]["host"] == "api.example.com"
    assert described["params_schema"]["properties"]["text"]["type"] == "string"


def test_http_provider_url_comes_from_env_then_settings_then_default(
    monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    provider = HttpJsonProvider(name="search-x", url="http://default", url_env="SEARCH_X_URL")
    monkeypatch.delenv("SEARCH_X_URL", raising=False)
    assert provider.endpoint() == "http://default"

    settings.SIGNALBOX_PROVIDER_URLS = {"search-x": "http://from-settings"}
    assert provider.endpoint() == "http://from-settings"

    monkeypatch.setenv("SEARCH_X_URL", "http://from-env")
    assert provider.endpoint() == "http://from-env"
