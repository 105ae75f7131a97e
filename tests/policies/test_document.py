"""The policy document (policies/document.py): what it accepts, what it refuses, and how it is
stored; validation is the same whether it comes from a source text or from the database."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from policies.document import PolicyDocument, duration_text, path_text
from tests.policies.documents import DENY, approval, document, rule


def refused(**sections: Any) -> str:
    """The validation message for a document that must be refused."""
    with pytest.raises(ValidationError) as raised:
        document(**sections)
    return str(raised.value)


def window(**fields: Any) -> dict[str, Any]:
    return {"days": ["mon-fri"], "start": "09:00", "end": "17:00", "zone": "UTC", **fields}


def test_the_default_must_be_written_and_is_allow_or_deny() -> None:
    with pytest.raises(ValidationError, match="default"):
        PolicyDocument.model_validate({})
    assert "allow" in refused(default="maybe")


def test_a_stored_document_with_a_dangling_reference_is_refused_too() -> None:
    # Not only the source reader checks references: the model does, so a stored JSON document
    # edited by hand cannot slip through.
    message = refused(
        rules=[rule("r", "tool:x", {"decision": "defer", "until": "office"}, {"window": "lunch"})]
    )
    assert "rules[0].when[0].window: no time window is called 'lunch'" in message
    assert "rules[0].outcome.until: no time window is called 'office'" in message


def test_days_durations_and_times_are_normalised() -> None:
    policy = document(
        time_windows={"weekend": window(days=["fri-mon", "wed"], start="8:05", end="24:00")},
        rules=[rule("r", "tool:x", approval(1, sla="1h30m"))],
    )
    weekend = policy.time_windows["weekend"]
    assert weekend.days == ["mon", "wed", "fri", "sat", "sun"]
    assert (weekend.start, weekend.end) == ("08:05", "24:00")
    assert policy.rules[0].outcome.sla == timedelta(minutes=90)  # type: ignore[union-attr]
    assert duration_text(timedelta(days=2, seconds=45)) == "2d45s"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"end": "09:00"}, "end must differ from start"),
        ({"start": "24:00", "end": "09:00"}, "start must be before 24:00"),
        ({"outside": {"decision": "defer"}}, "outside needs applies_to"),
        ({"applies_to": {"action": "tool:x"}}, "says what happens outside it"),
        ({"days": []}, "must list days"),
        ({"zone": "Europe/Atlantis"}, "is not a time zone"),
    ],
)
def test_windows_that_make_no_sense_are_refused(fields: dict[str, Any], message: str) -> None:
    assert message in refused(time_windows={"w": window(**fields)})


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ({"fact": "params.to", "op": "not_in_allowlist"}, "needs the name of an allowlist"),
        (
            {"fact": "params.to", "op": "not_in_allowlist", "allowlist": "x", "value": 1},
            "not a value",
        ),
        (
            {"fact": "params.to", "op": "==", "allowlist": "x"},
            "use in_allowlist or not_in_allowlist",
        ),
        ({"fact": "params.to", "op": "=="}, "needs a value"),
        ({"fact": "params.to", "op": "in", "value": "EUR"}, "needs a list"),
        ({"fact": "params.to", "op": "==", "value": ["EUR"]}, "use in or not_in"),
        ({"fact": "params.to", "op": ">=", "value": True}, "needs a number"),
        ({"fact": "params", "op": "==", "value": 1}, "params needs a path"),
        ({"fact": "tenant.name", "op": "==", "value": 1}, "tenant has no parts"),
        ({"fact": "spend.week", "op": ">", "value": 1}, "the scope must be one of"),
        ({"fact": "params..x", "op": ">", "value": 1}, "has an empty part"),
        ({"fact": "params.x", "op": "~", "value": 1}, "op"),
    ],
)
def test_conditions_whose_operands_do_not_fit_are_refused(
    condition: dict[str, Any], message: str
) -> None:
    assert message in refused(rules=[rule("r", "tool:x", DENY, condition)])


def test_approvals_deny_reasons_and_ids() -> None:
    assert "give either tier" in refused(
        rules=[rule("r", "tool:x", {"decision": "require_approval"})]
    )
    assert "quorum" in refused(rules=[rule("r", "tool:x", approval(1, quorum=0))])
    assert "reason" in refused(rules=[rule("r", "tool:x", {"decision": "deny"})])
    assert "sla" in refused(rules=[rule("r", "tool:x", approval(1, sla="0s"))])
    assert "already used" in refused(rules=[rule("r", "tool:x", DENY), rule("r", "tool:y", DENY)])


def test_ceilings_prices_and_rate_limits() -> None:
    assert "already ceilings[0]" in refused(
        ceilings=[{"scope": "run", "limit": 1}, {"scope": "run", "limit": 2}]
    )
    assert "must be above zero" in refused(ceilings=[{"scope": "run", "limit": 0}])
    assert "at most 6 digits" in refused(ceilings=[{"scope": "run", "limit": "0.0000001"}])
    assert "soft_ratio" in refused(ceilings=[{"scope": "run", "limit": 1, "soft_ratio": 1.5}])
    assert "input_per_1k" in refused(prices={"m": {"output_per_1k": 1}})
    limit = {"id": "a", "action": "tool:x", "limit": 1, "period": "1m"}
    assert "already used" in refused(rate_limits=[limit, limit])
    assert "workflow's name" in refused(bounds={"refund_*": {"max_retries": 1}})


def test_stored_json_keeps_thresholds_as_numbers_and_money_exact() -> None:
    policy = document(
        rules=[
            rule(
                "r", "tool:x", DENY, {"fact": "params.amount", "op": ">", "value": Decimal("100.5")}
            )
        ],
        ceilings=[{"scope": "run", "limit": Decimal("0.10")}],
    )
    stored = json.loads(json.dumps(policy.to_json()))
    assert stored["rules"][0]["when"][0]["value"] == 100.5
    assert stored["ceilings"][0]["limit"] == "0.10"
    again = PolicyDocument.model_validate(stored)
    assert again == policy
    assert again.rules[0].when[0].value == Decimal("100.5")  # type: ignore[union-attr]


def test_the_json_schema_is_json_and_names_every_section() -> None:
    schema = PolicyDocument.model_json_schema()
    json.dumps(schema)
    assert set(schema["properties"]) >= {
        "default",
        "rules",
        "time_windows",
        "allowlists",
        "ceilings",
        "prices",
        "rate_limits",
        "bounds",
    }
    assert schema["required"] == ["default"]
    assert schema["additionalProperties"] is False


def test_paths_read_as_written() -> None:
    assert path_text(("rules", 2, "outcome", "tier")) == "rules[2].outcome.tier"
    assert path_text(("prices", "gpt-4.1", "input_per_1k")) == 'prices["gpt-4.1"].input_per_1k'
