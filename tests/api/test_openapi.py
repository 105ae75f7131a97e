"""The OpenAPI document and the docs page: public, complete, and free of CDN assets."""

from __future__ import annotations

import re

import pytest

from console.api import api

pytestmark = pytest.mark.django_db

PATHS = {
    "/api/v1/health": {"get"},
    "/api/v1/runs": {"get", "post"},
    "/api/v1/runs/{run_id}": {"get"},
    "/api/v1/runs/{run_id}/cancel": {"post"},
    "/api/v1/runs/{run_id}/events": {"post"},
    "/api/v1/approvals": {"get"},
    "/api/v1/approvals/{approval_id}/decide": {"post"},
    "/api/v1/workflows": {"get"},
    "/api/v1/workflows/{name}": {"get"},
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
        ("post", "/api/v1/runs", {"200", "201", "401", "403", "404", "409", "413", "422"}),
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
