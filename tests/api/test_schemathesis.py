"""Property-based tests of the whole REST API, generated from its OpenAPI document.

schemathesis sends 150 generated requests to every operation through Django's own
WSGI handler (the whole middleware chain, the real token auth) as a real operator, against the
PostgreSQL test database with real commits: no 5xx, and every response must be one the document
declares, in the shape it declares. Path ids are drawn half of the time from objects that exist
(a run waiting on an approval, an open escalation), so bodies reach the services and the
database rather than stopping at a 404. About 4 to 5 minutes for the 30 operations on two busy
cores (it runs beside the rest of the suite, inside CI's 20 minutes); examples are random on each
run, so successive runs cover more (a failure prints how to reproduce it).
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from console.api import api
from console.models import ApiToken, token_digest
from orchestration.models import Wait
from orchestration.registry import workflow_list
from orchestration.services import run_submit

EXAMPLES = 150

schema = schemathesis.openapi.from_dict(api.get_openapi_schema())
schema.app = WSGIHandler()

#: What the generated requests are checked for. Not ``positive_data_acceptance``: a request
#: that satisfies the document can still be refused for what only the server knows (an unknown
#: workflow, an input its contract refuses, a run that already ended).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]

#: Ids of objects that exist (and workflow names), by path parameter, set by ``live_objects``.
EXISTING: dict[str, list[Any]] = {}


#: The operator's bearer token: known before any test runs, because schemathesis builds some
#: requests (its coverage phase) while collecting; each test stores it for a fresh operator.
RAW_TOKEN = "sbx_" + secrets.token_urlsafe(32)


@schema.auth(refresh_interval=None)
class OperatorToken:
    """Every request as the operator (declared to schemathesis, so that its checks of the
    security scheme, e.g. a request without credentials must get 401, still apply)."""

    def get(self, case: schemathesis.Case, context: Any) -> str:
        return RAW_TOKEN

    def set(self, case: schemathesis.Case, data: str, context: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


def well_formed(name: str, value: Any) -> bool:
    """Whether a generated path parameter is valid (so swapping it keeps the request valid)."""
    if name == "name":
        return isinstance(value, str)
    return type(value) is int and 1 <= value < 2**63


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any]) -> Any:
    """Half of the well-formed ids (and workflow names) name an object that exists. An invalid
    one (in a negative case) stays as generated: replacing it would make the request valid."""
    if not path_parameters:
        return st.just(path_parameters)
    choices = [
        st.sampled_from(EXISTING[name]).map(lambda pk, name=name: (name, pk))
        for name, value in path_parameters.items()
        if EXISTING.get(name) and well_formed(name, value)
    ]
    if not choices:
        return st.just(path_parameters)
    return st.one_of(
        st.just(path_parameters),
        st.one_of(choices).map(lambda pair: {**path_parameters, pair[0]: pair[1]}),
    )


@schema.hook
def flatmap_body(context: Any, body: Any) -> Any:
    """Half of the submits with a well-formed workflow name name one that exists, so that runs
    are created (through the batched submit) instead of 404 ``unknown_workflow``."""
    operation = context.operation
    workflow = body.get("workflow") if isinstance(body, dict) else None
    if (
        operation is None
        or (operation.method.upper(), operation.path) != ("POST", "/api/v1/runs")
        or not (isinstance(workflow, str) and 1 <= len(workflow) <= 100 and "\x00" not in workflow)
    ):
        return st.just(body)
    version = body.get("version")
    if version is not None and not (type(version) is int and 1 <= version < 2**31):
        # A negative case whose invalid part is the version: dropping it would make it valid.
        return st.just(body)
    known = {key: value for key, value in body.items() if key != "version"}
    return st.sampled_from([body, {**known, "workflow": "reference_workload"}])


@pytest.fixture
def operator_token(operator: Any) -> None:
    ApiToken.objects.create(
        user=operator, name="schemathesis", digest=token_digest(RAW_TOKEN), prefix=RAW_TOKEN[:8]
    )


@pytest.fixture
def live_objects(operator: Any, drive: Callable[[int], Any], settings: Any) -> Iterator[None]:
    """Runs waiting on an approval and runs with an open escalation, their ids offered to the
    generated requests. Afterwards the broker's queues are emptied: real commits sent wake-ups
    for the steps they queued, for rows the end of the test deletes, and a later test's
    workers should not have to wade through them."""
    settings.SIGNALBOX = {
        **settings.SIGNALBOX,
        "AGENT_TIME_SCALE": 0.0,
        "LIVE_EVENTS": False,
        "RETRY_BASE_SECONDS": 0.0,
    }
    approvals, escalations = [], []
    for _ in range(3):
        run = run_submit(
            workflow="reference_workload", input={"needs_approval": True}, submitted_by=None
        ).run
        drive(run.pk)
        approvals.append(Wait.objects.get(run=run, kind="approval", status="open"))
        run = run_submit(
            workflow="escalating", input={"fail_attempts": 2, "text": "hi"}, submitted_by=operator
        ).run
        drive(run.pk)
        escalations.append(Wait.objects.get(run=run, kind="escalation", status="open"))
    EXISTING.update(
        run_id=[w.run_id for w in approvals + escalations],
        approval_id=[w.pk for w in approvals],
        escalation_id=[w.pk for w in escalations],
        name=sorted({workflow.name for workflow in workflow_list()}),
    )
    yield
    EXISTING.clear()
    broker = redis.Redis.from_url(settings.REDIS_URL)
    # Only the queues (lists): the exchange bindings and the tools' shared limits stay.
    for key in broker.scan_iter():
        if broker.type(key) == b"list":
            broker.delete(key)


@pytest.fixture
def statuses(request: pytest.FixtureRequest) -> Iterator[Counter[int]]:
    """The statuses of the requests one operation's test sent; after the test, at least
    EXAMPLES of them for every operation that takes any input (printed with ``-s``)."""
    seen: Counter[int] = Counter()
    failed_before = request.session.testsfailed
    yield seen
    operation = request.node.name.partition("[")[2].removesuffix("]")
    print(f"\n{operation}: {seen.total()} requests, {dict(sorted(seen.items()))}")
    if request.session.testsfailed > failed_before:
        return  # stopped at its first failure, reported already
    if operation != "GET /api/v1/health":  # no parameters, no credentials: nothing to vary
        assert seen.total() >= EXAMPLES, (operation, seen)


@pytest.mark.django_db(transaction=True)
@schema.parametrize()
@hypothesis_settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no example database written into the work tree
    suppress_health_check=list(HealthCheck),
)
def test_the_api_answers_every_generated_request_as_documented(
    case: schemathesis.Case, operator_token: None, live_objects: None, statuses: Counter[int]
) -> None:
    response = case.call()
    # A body over the size limit is refused before it is parsed (413): that is its rejection.
    checks = (
        CHECKS
        if response.status_code != 413
        else [c for c in CHECKS if c is not negative_data_rejection]
    )
    case.validate_response(response, checks=checks)
    statuses[response.status_code] += 1
