"""The OpenAPI document and the docs page: public, complete, and free of CDN assets."""

from __future__ import annotations

import json
import re

import jsonschema_rs  # schemathesis validates with it too
import pytest

from console.api import api

pytestmark = pytest.mark.django_db

PATHS = {
    "/api/v1/spend/ceilings": {"get"},
    "/api/v1/spend/runs/{run_id}/reservations": {"get"},
    "/api/v1/spend/runs/{run_id}/ceiling": {"post"},
    "/api/v1/health": {"get"},
    "/api/v1/runs": {"get", "post"},
    "/api/v1/runs/{run_id}": {"get"},
    "/api/v1/runs/{run_id}/cancel": {"post"},
    "/api/v1/runs/{run_id}/retry": {"post"},
    "/api/v1/runs/{run_id}/skip": {"post"},
    "/api/v1/runs/{run_id}/events": {"post"},
    "/api/v1/approvals": {"get"},
    "/api/v1/approvals/{approval_id}/decide": {"post"},
    "/api/v1/approvals/decide": {"post"},
    "/api/v1/escalations": {"get"},
    "/api/v1/escalations/{escalation_id}": {"get"},
    "/api/v1/escalations/{escalation_id}/resolve": {"post"},
    "/api/v1/escalations/{escalation_id}/raise-ceiling": {"post"},
    "/api/v1/workflows": {"get"},
    "/api/v1/workflows/{name}": {"get"},
    "/api/v1/capabilities": {"get"},
    "/api/v1/policies/": {"get"},
    "/api/v1/policies/{name}/versions": {"get", "post"},
    "/api/v1/policies/versions/{version_id}": {"get"},
    "/api/v1/policies/versions/{version_id}/submit": {"post"},
    "/api/v1/policies/versions/{version_id}/review": {"post"},
    "/api/v1/policies/versions/{version_id}/activate": {"post"},
    "/api/v1/policies/versions/{version_id}/rollback": {"post"},
    "/api/v1/policies/versions/{version_id}/simulation": {"get"},
    "/api/v1/policies/diff": {"get"},
}


@pytest.fixture
def schema(client):
    response = client.get("/api/openapi.json")
    assert response.status_code == 200
    return response.json()


def test_the_schema_loads_without_authentication_and_lists_every_path(schema):
    assert schema["info"]["title"] == "Signalbox"
    for path, methods in PATHS.items():
        assert path in schema["paths"], path
        assert methods <= set(schema["paths"][path]), path


def test_the_schema_matches_what_the_api_object_builds(schema):
    assert set(schema["paths"]) == set(api.get_openapi_schema()["paths"])
    assert set(schema["paths"]) == set(PATHS)


def test_escalations_have_one_name(schema):
    text = json.dumps(schema).lower()
    assert "dead" + "-letter" not in text and "dead" + "letter" not in text
    assert "dead" + "_letter" not in text and "dead" + " letter" not in text
    assert {"EscalationOut", "EscalationPageOut", "EscalationResolveIn"} <= set(
        schema["components"]["schemas"]
    )


def test_every_operation_with_a_body_documents_400_malformed_json(schema):
    with_body = [
        (method, path, operation)
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        if "requestBody" in operation
    ]
    assert len(with_body) == 14
    for method, path, operation in with_body:
        response = operation["responses"].get("400")
        assert response is not None, (method, path)
        assert "malformed_json" in response["description"], (method, path)
        ref = response["content"]["application/json"]["schema"]["$ref"]
        assert ref == "#/components/schemas/ErrorOut", (method, path)


def body_schema(schema, name):
    return jsonschema_rs.validator_for(schema["components"]["schemas"][name])


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({"decision": "approve"}, True),
        ({"decision": "reject", "reason": "wrong customer"}, True),
        ({"decision": "reject"}, False),
        ({"decision": "reject", "reason": "   "}, False),
        ({"decision": "edit", "reason": "fix", "edited_input": {"text": "x"}}, True),
        ({"decision": "edit", "edited_input": {"text": "x"}}, False),
        ({"decision": "edit", "reason": "fix"}, False),
        ({"decision": "approve", "edited_input": {"text": "x"}}, False),
        ({"decision": "approve", "reason": "a\u0000b"}, False),
    ],
)
def test_the_decision_rules_are_stated_in_the_document(schema, body, valid):
    assert body_schema(schema, "ApprovalDecideIn").is_valid(body) is valid
    description = schema["components"]["schemas"]["ApprovalDecideIn"]["description"]
    assert "reason_required" in description and "edited_input_missing" in description


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({"action": "retry"}, True),
        ({"action": "abort", "reason": "customer left"}, True),
        ({"action": "abort"}, False),
        ({"action": "skip", "reason": "by hand", "output": {"text": "x"}}, True),
        ({"action": "skip", "output": {"text": "x"}}, False),
        ({"action": "skip", "reason": " ", "output": {"text": "x"}}, False),
        ({"action": "skip", "reason": "by hand"}, False),
        ({"action": "retry", "output": {"text": "x"}}, False),
    ],
)
def test_the_escalation_rules_are_stated_in_the_document(schema, body, valid):
    assert body_schema(schema, "EscalationResolveIn").is_valid(body) is valid
    description = schema["components"]["schemas"]["EscalationResolveIn"]["description"]
    assert "reason_required" in description and "output_missing" in description


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("RunSubmitIn", "workflow"),
        ("RunSubmitIn", "tenant"),
        ("RunCancelIn", "reason"),
        ("RunEventIn", "name"),
        ("RunEventIn", "event_id"),
        ("ApprovalDecideIn", "reason"),
        ("EscalationResolveIn", "reason"),
    ],
)
def test_stored_text_fields_document_that_nul_is_refused(schema, name, field):
    validator = jsonschema_rs.validator_for(
        schema["components"]["schemas"][name]["properties"][field]
    )
    assert validator.is_valid("plain text")
    assert not validator.is_valid("a\u0000b")


@pytest.mark.parametrize(("name", "field"), [("RunSubmitIn", "input"), ("RunEventIn", "payload")])
def test_json_fields_say_what_cannot_be_stored(schema, name, field):
    description = schema["components"]["schemas"][name]["properties"][field]["description"]
    assert "NUL" in description and "NaN" in description and "100 levels" in description


def test_every_authenticated_operation_documents_401_with_the_error_shape(schema):
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path == "/api/v1/health":
                assert "security" not in operation
                continue
            assert operation["security"], (method, path)
            response = operation["responses"]["401"]
            ref = response["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorOut", (method, path)


@pytest.mark.parametrize(
    ("method", "path", "statuses"),
    [
        ("post", "/api/v1/runs", {"200", "201", "400", "401", "403", "404", "409", "413", "422"}),
        ("get", "/api/v1/runs", {"200", "401", "422"}),
        ("get", "/api/v1/runs/{run_id}", {"200", "401", "404", "422"}),
        ("post", "/api/v1/runs/{run_id}/cancel", {"200", "401", "403", "404", "409", "413", "422"}),
        ("post", "/api/v1/runs/{run_id}/events", {"202", "401", "403", "404", "409", "413", "422"}),
        (
            "post",
            "/api/v1/approvals/{approval_id}/decide",
            {"200", "401", "403", "404", "409", "413", "422"},
        ),
        ("get", "/api/v1/workflows/{name}", {"200", "401", "404"}),
        ("get", "/api/v1/escalations", {"200", "401", "422"}),
        (
            "post",
            "/api/v1/escalations/{escalation_id}/resolve",
            {"200", "400", "401", "403", "404", "409", "413", "422"},
        ),
        (
            "post",
            "/api/v1/escalations/{escalation_id}/raise-ceiling",
            {"200", "400", "401", "403", "404", "409", "413", "422"},
        ),
        (
            "post",
            "/api/v1/runs/{run_id}/retry",
            {"200", "400", "401", "403", "404", "409", "413", "422"},
        ),
        (
            "post",
            "/api/v1/runs/{run_id}/skip",
            {"200", "400", "401", "403", "404", "409", "413", "422"},
        ),
    ],
)
def test_error_responses_are_documented(schema, method, path, statuses):
    assert statuses <= set(schema["paths"][path][method]["responses"])


def test_the_error_schema_has_a_code_and_a_message(schema):
    body = schema["components"]["schemas"]["ErrorBody"]
    assert {"code", "message"} <= set(body["required"])
    assert "detail" in body["properties"]


def test_both_authentication_schemes_are_documented(schema):
    schemes = schema["components"]["securitySchemes"]
    assert {"type": "http", "scheme": "bearer"} in schemes.values()
    assert any(s["type"] == "apiKey" and s["in"] == "cookie" for s in schemes.values())


def test_step_errors_are_documented_with_a_class_field(schema):
    assert "class" in schema["components"]["schemas"]["StepError"]["properties"]


def test_the_docs_page_serves_local_assets_only(client):
    response = client.get("/api/docs")
    assert response.status_code == 200
    html = response.content.decode()
    assert "swagger-ui-bundle.js" in html
    assets = re.findall(r"""<(?:script|link)\b[^>]*?(?:src|href)=["']([^"']+)""", html)
    assert assets
    assert not [a for a in assets if re.match(r"(?:https?:)?//", a)], assets
    assert not re.search(r"https?://(?:cdn|unpkg|fastly|cdnjs)", html)


def test_error_responses_say_which_codes_they_carry(schema):
    responses = schema["paths"]["/api/v1/approvals/{approval_id}/decide"]["post"]["responses"]
    assert "reason_required" in responses["422"]["description"]
    assert "unstorable_value" in responses["422"]["description"]
    assert "already_decided" in responses["409"]["description"]
    assert "unauthenticated" in responses["401"]["description"]
