"""Cost ceilings in the engine (issue 18): an agent step reserves its worst case before it runs
and settles its reported usage after; an unknown model fails closed; a refused reservation
escalates, and a tier-2 operator raises the run's ceiling and retries."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from audit.models import AuditEvent
from audit.verbs import Verb
from console.models import ApiToken
from orchestration.agents.openai_compat import ChatCompletionAgent
from orchestration.errors import Code, InvalidInput, PermissionDenied
from orchestration.models import Step, Wait
from orchestration.services import escalation_raise_ceiling, escalation_resolve, run_submit
from policies.active import active_forget
from policies.errors import PolicyDenied
from policies.ledger import ceiling_raise
from policies.models import Reservation, SpendScope
from policies.services import policy_install
from tests.conftest import OPERATOR_PERMISSIONS
from tests.factories import UserFactory
from tests.support.agents import EchoAgent
from tests.support.stub_llm import StubLLM, StubReply, stub_llm_server

pytestmark = pytest.mark.django_db

POLICY = """
default: allow
ceilings:
  - {scope: run, limit: %s}
  - {scope: tenant_month, limit: 50.00}
  - {scope: global_day, limit: 10.00}
prices:
  known-model: {input_per_1k: 0.001, output_per_1k: 0.002}
"""


def _install(run_limit: str) -> None:
    policy_install(source=POLICY % run_limit, note="ledger tests")
    active_forget()


@pytest.fixture
def priced_echo(monkeypatch: pytest.MonkeyPatch) -> None:
    """The echo agent calls ``known-model`` and reports 100 tokens in, 50 out."""
    original = EchoAgent.run

    def run(self: EchoAgent, input: Any, ctx: Any) -> Any:
        # with a ceiling in force, the call may ask for what its reservation covers
        assert ctx.max_tokens in (None, 1024)
        ctx.report_usage(prompt_tokens=100, completion_tokens=50, model="known-model")
        return original(self, input, ctx)

    monkeypatch.setattr(EchoAgent, "model", "known-model")
    monkeypatch.setattr(EchoAgent, "run", run)


def test_each_agent_step_is_reserved_then_settled_with_its_usage(
    priced_echo: None, drive: Any, fast_agents: None
):
    _install("1.00")
    run = drive(run_submit(workflow="siblings", input={"text": "t"}).run.pk)
    assert run.status == "succeeded"
    reservations = Reservation.objects.filter(run_id=run.pk)
    assert [r.status for r in reservations] == ["settled"] * 4
    # 100 in, 50 out: 0.0001 + 0.0001 per call, four calls
    scope = SpendScope.objects.get(kind="run", key=str(run.pk))
    assert (scope.spent, scope.reserved) == (Decimal("0.0008"), Decimal(0))
    assert SpendScope.objects.get(kind="global_day").spent == Decimal("0.0008")


def test_an_unknown_model_fails_closed(
    priced_echo: None, monkeypatch: pytest.MonkeyPatch, drive: Any, fast_agents: None
):
    monkeypatch.setattr(EchoAgent, "model", "mystery-model")
    _install("1.00")
    run = drive(run_submit(workflow="siblings", input={"text": "t"}).run.pk)
    step = Step.objects.get(run=run, node="start")
    assert step.error_code == Code.COST_UNKNOWN and "mystery-model" in step.error_message
    assert not Reservation.objects.exists()
    assert AuditEvent.objects.filter(verb=Verb.COST_UNKNOWN, run_id=run.pk).count() == 1


def test_a_call_past_the_run_ceiling_escalates_and_a_raise_lets_it_continue(
    priced_echo: None, drive: Any, fast_agents: None, operator: Any
):
    _install("0.001")  # one call's worst case is 0.004048
    run = drive(run_submit(workflow="siblings", input={"text": "t"}).run.pk)
    wait = Wait.objects.get(run=run, kind="escalation", status="open")
    step = Step.objects.get(run=run, node="start")
    assert step.error_code == Code.CEILING_EXCEEDED
    assert "run ceiling" in step.error_message and "0.004048" in step.error_message
    ceiling_raise(run_id=run.pk, new_limit=Decimal("1"), user=operator, reason="long ticket")
    escalation_resolve(wait_id=wait.pk, user=operator, action="retry", reason="ceiling raised")
    run = drive(run.pk)
    assert run.status == "succeeded"
    assert SpendScope.objects.get(kind="run", key=str(run.pk)).spent == Decimal("0.0008")


def test_no_ceilings_means_no_reservation(priced_echo: None, drive: Any, fast_agents: None):
    policy_install(
        source="default: allow\nprices:\n  known-model: {input_per_1k: 0.001, output_per_1k: 0.002}\n"
    )
    active_forget()
    run = drive(run_submit(workflow="siblings", input={"text": "t"}).run.pk)
    assert run.status == "succeeded", list(
        Step.objects.filter(run=run).values_list("node", "status", "error_code", "error_message")
    )
    assert not Reservation.objects.exists()


@pytest.fixture
def llm(monkeypatch: pytest.MonkeyPatch) -> Iterator[StubLLM]:
    """A local chat-completions endpoint; the chat agent asks it for ``known-model``."""
    with stub_llm_server() as stub:
        monkeypatch.setenv("SIGNALBOX_LLM_BASE_URL", stub.base_url)
        monkeypatch.setenv("SIGNALBOX_LLM_MODEL", "known-model")
        monkeypatch.delenv("SIGNALBOX_LLM_API_KEY", raising=False)
        yield stub


def test_the_chat_agent_is_priced_as_its_model_and_asks_for_what_its_reservation_covers(
    llm: StubLLM, drive: Any, fast_agents: None
):
    _install("1.00")
    llm.usage = {"prompt_tokens": 30, "completion_tokens": 200}
    run = drive(run_submit(workflow="priced_chat", input={"prompt": "Summarise ticket 7"}).run.pk)
    assert run.status == "succeeded", run.error_message
    [reservation] = Reservation.objects.filter(run_id=run.pk)
    # The worst case: the prompt's 18 bytes + 4 tokens in, the agent's 1024 tokens out.
    assert reservation.amount == Decimal("0.000022") + Decimal("0.002048")
    [request] = llm.requests
    assert request.body["model"] == "known-model"
    assert request.body["max_tokens"] == ChatCompletionAgent.max_tokens == 1024
    # Settled with what the endpoint reported: 30 in, 200 out.
    assert (reservation.status, reservation.actual) == ("settled", Decimal("0.00043"))
    scope = SpendScope.objects.get(kind="run", key=str(run.pk))
    assert (scope.spent, scope.reserved) == (Decimal("0.00043"), Decimal(0))


def test_a_chat_agent_whose_model_has_no_price_fails_closed_before_calling(
    llm: StubLLM, monkeypatch: pytest.MonkeyPatch, drive: Any, fast_agents: None
):
    monkeypatch.delenv("SIGNALBOX_LLM_MODEL")  # the server would pick: nobody knows the price
    _install("1.00")
    run = drive(run_submit(workflow="priced_chat", input={"prompt": "Hi"}).run.pk)
    step = Step.objects.get(run=run, node="ask")
    assert step.error_code == Code.COST_UNKNOWN and "endpoint-default" in step.error_message
    assert llm.requests == [] and not Reservation.objects.exists()


def test_usage_reported_under_a_dated_model_name_is_priced_as_the_model_asked_for(
    llm: StubLLM, drive: Any, fast_agents: None
):
    _install("1.00")
    llm.usage = {"prompt_tokens": 30, "completion_tokens": 200}
    llm.queue(
        StubReply(
            body=llm.completion({"model": "known-model-2026-06-01", "messages": [{"content": "x"}]})
        )
    )
    run = drive(run_submit(workflow="priced_chat", input={"prompt": "Hi"}).run.pk)
    assert run.status == "succeeded", run.error_message
    [reservation] = Reservation.objects.filter(run_id=run.pk)
    assert reservation.actual == Decimal("0.00043")  # not the whole reservation


TIER_1 = [
    p
    for p in OPERATOR_PERMISSIONS
    if p not in ("orchestration.decide_tier_2", "orchestration.decide_tier_3")
]


def test_a_ceiling_escalation_waits_for_tier_2_and_refuses_a_tier_1_operator_everywhere(
    priced_echo: None, drive: Any, fast_agents: None
):
    """Only someone who may raise the ceiling decides a run stopped at one: a tier-1 operator
    could only retry into the same ceiling (or skip or abort the work someone meant to fund).
    Their retry, skip or abort is a 403 from the service, the API and the inbox, each recorded."""
    _install("0.001")
    tier1 = UserFactory(username="tier1", permissions=TIER_1)
    tier2 = UserFactory(username="tier2", permissions=[*TIER_1, "orchestration.decide_tier_2"])
    run = drive(run_submit(workflow="siblings", input={"text": "t"}).run.pk)
    wait = Wait.objects.get(run=run, kind="escalation", status="open")
    assert wait.tier == 2 and wait.action["why"] == "limit reached (cost ceiling)"

    for action, output in (("retry", None), ("skip", {"text": "by hand"}), ("abort", None)):
        with pytest.raises(PermissionDenied) as refused:
            escalation_resolve(
                wait_id=wait.pk, user=tier1, action=action, reason="go", output=output
            )
        assert refused.value.code == Code.TIER_TOO_LOW and "cost ceiling" in refused.value.message
    _, token = ApiToken.issue(tier1, "tests")
    api = Client(HTTP_AUTHORIZATION=f"Bearer {token}").post(
        f"/api/v1/escalations/{wait.pk}/resolve",
        {"action": "retry", "reason": "go"},
        content_type="application/json",
    )
    assert api.status_code == 403 and api.json()["error"]["code"] == Code.TIER_TOO_LOW
    page = Client()
    page.force_login(tier1)
    inbox = page.post(
        reverse("console:inbox_item", args=[wait.pk]), {"op": "retry", "reason": "go"}
    )
    assert inbox.status_code == 403
    with pytest.raises(PolicyDenied):
        ceiling_raise(run_id=run.pk, new_limit=Decimal("1"), user=tier1, reason="more")
    refusals = AuditEvent.objects.filter(verb=Verb.ACCESS_DENIED, actor_id="tier1", run_id=run.pk)
    assert refusals.count() == 5  # three service calls, the API and the inbox
    assert Wait.objects.get(pk=wait.pk).status == "open"
    assert not SpendScope.objects.filter(
        kind="run", key=str(run.pk), limit__gt=Decimal("0.001")
    ).exists()

    ceiling_raise(run_id=run.pk, new_limit=Decimal("1"), user=tier2, reason="long ticket")
    escalation_resolve(wait_id=wait.pk, user=tier2, action="retry", reason="ceiling raised")
    assert drive(run.pk).status == "succeeded"


def _escalated_at_run_ceiling(drive: Any) -> tuple[Any, Wait]:
    _install("0.001")  # one call's worst case is 0.004048
    run = drive(run_submit(workflow="siblings", input={"text": "t"}).run.pk)
    return run, Wait.objects.get(run=run, kind="escalation", status="open")


def test_the_item_page_raises_the_run_ceiling_and_retries_in_one_step(
    priced_echo: None, drive: Any, fast_agents: None, operator: Any
):
    """The escalation says what the call needs and offers the least limit that lets it
    through; a bad number, a lower limit or no reason is refused beside the field with nothing
    changed; a good one raises the ceiling (audited), retries the step and the run finishes."""
    run, wait = _escalated_at_run_ceiling(drive)
    page = Client()
    page.force_login(operator)
    url = reverse("console:inbox_item", args=[wait.pk])

    html = page.get(url).content.decode()
    assert "Raise this run's ceiling, then retry" in html
    assert "At least $0.004048 lets this call through." in html
    assert 'name="new_limit" inputmode="decimal" value="0.004048"' in html

    for posted, status, error in (
        ({"new_limit": "lots", "reason": "x"}, 422, "a number of dollars, e.g. 0.0025"),
        ({"new_limit": "-1", "reason": "x"}, 422, "a number of dollars above 0"),
        ({"new_limit": "0.0005", "reason": "x"}, 409, "does not raise it"),
        ({"new_limit": "0.01", "reason": " "}, 422, "say why the ceiling is raised"),
    ):
        response = page.post(url, {"op": "raise_ceiling", **posted})
        assert response.status_code == status, (posted, response.status_code)
        assert error in response.content.decode(), posted
        assert Wait.objects.get(pk=wait.pk).status == "open"
        assert SpendScope.objects.get(kind="run", key=str(run.pk)).limit == Decimal("0.001")
    # A refused value stays in the field to be fixed, with the reason given.
    response = page.post(url, {"op": "raise_ceiling", "new_limit": "lots", "reason": "x y"})
    assert 'value="lots"' in response.content.decode()
    assert 'name="reason" size="50" value="x y"' in response.content.decode()

    response = page.post(url, {"op": "raise_ceiling", "new_limit": "0.01", "reason": "long ticket"})
    assert response.status_code == 302 and response["Location"] == reverse("console:inbox")
    assert SpendScope.objects.get(kind="run", key=str(run.pk)).limit == Decimal("0.01")
    decided = Wait.objects.get(pk=wait.pk)
    assert (decided.status, decided.decision, decided.decided_by) == ("resolved", "retry", operator)
    raised = AuditEvent.objects.get(verb=Verb.CEILING_RAISED, run_id=run.pk)
    assert raised.data["to"] == "0.010000" and raised.data["reason"] == "long ticket"
    assert drive(run.pk).status == "succeeded"
    # A second click finds it answered, and raises nothing more.
    again = page.post(url, {"op": "raise_ceiling", "new_limit": "0.02", "reason": "again"})
    assert again.status_code == 409 and "already" in again.content.decode()
    assert SpendScope.objects.get(kind="run", key=str(run.pk)).limit == Decimal("0.01")


def test_a_tier_1_operator_sees_no_raise_form_and_cannot_post_one(
    priced_echo: None, drive: Any, fast_agents: None
):
    run, wait = _escalated_at_run_ceiling(drive)
    tier1 = UserFactory(username="tier1", permissions=TIER_1)
    page = Client()
    page.force_login(tier1)
    url = reverse("console:inbox_item", args=[wait.pk])
    assert 'id="ceiling-form"' not in page.get(url).content.decode()
    response = page.post(url, {"op": "raise_ceiling", "new_limit": "1", "reason": "more"})
    assert response.status_code == 403
    assert SpendScope.objects.get(kind="run", key=str(run.pk)).limit == Decimal("0.001")
    assert Wait.objects.get(pk=wait.pk).status == "open"


def test_an_escalation_that_did_not_stop_at_the_run_ceiling_cannot_be_answered_by_a_raise(
    drive: Any, operator: Any, fast_agents: None, settings: Any
):
    settings.SIGNALBOX = {**settings.SIGNALBOX, "RETRY_BASE_SECONDS": 0.0}
    run = drive(run_submit(workflow="escalating", input={"fail_attempts": 2}).run.pk)
    wait = Wait.objects.get(run=run, kind="escalation", status="open")
    with pytest.raises(InvalidInput) as refused:
        escalation_raise_ceiling(
            wait_id=wait.pk, user=operator, new_limit=Decimal("1"), reason="more"
        )
    assert "did not stop at a cost ceiling" in refused.value.message
    page = Client()
    page.force_login(operator)
    url = reverse("console:inbox_item", args=[wait.pk])
    assert 'id="ceiling-form"' not in page.get(url).content.decode()
    assert Wait.objects.get(pk=wait.pk).status == "open"


def test_a_shared_ceiling_is_named_on_the_page_and_not_raised_from_it(
    priced_echo: None, drive: Any, fast_agents: None, operator: Any
):
    run, wait = _escalated_at_run_ceiling(drive)
    action = wait.action
    action["error"]["detail"].update(kind="workflow_day", key="siblings")
    Wait.objects.filter(pk=wait.pk).update(action=action)
    page = Client()
    page.force_login(operator)
    html = page.get(reverse("console:inbox_item", args=[wait.pk])).content.decode()
    assert 'id="ceiling-form"' not in html
    assert "It stopped at the workflow&#x27;s daily ceiling (siblings)" in html
    with pytest.raises(InvalidInput) as refused:
        escalation_raise_ceiling(
            wait_id=wait.pk, user=operator, new_limit=Decimal("1"), reason="more"
        )
    assert "shared ceiling (workflow_day siblings)" in refused.value.message
    assert SpendScope.objects.get(kind="run", key=str(run.pk)).limit == Decimal("0.001")


def test_the_api_raises_the_run_ceiling_and_retries_as_the_page_does(
    priced_echo: None, drive: Any, fast_agents: None, operator: Any
):
    run, wait = _escalated_at_run_ceiling(drive)
    tier1 = UserFactory(username="tier1", permissions=TIER_1)

    def post(user: Any, body: Any) -> Any:
        _, token = ApiToken.issue(user, "tests")
        return Client(HTTP_AUTHORIZATION=f"Bearer {token}").post(
            f"/api/v1/escalations/{wait.pk}/raise-ceiling", body, content_type="application/json"
        )

    refusals = (
        (tier1, {"new_limit": "1", "reason": "more"}, 403, "tier_too_low"),
        (operator, {"new_limit": "0.0005", "reason": "more"}, 409, "ceiling_not_raised"),
        (operator, {"new_limit": "-1", "reason": "more"}, 422, None),
        (operator, {"new_limit": "1", "reason": ""}, 422, None),
        (operator, {"new_limit": "1.0000001", "reason": "more"}, 422, None),
    )
    for user, body, status, code in refusals:
        response = post(user, body)
        assert response.status_code == status, (body, response.content)
        if code:
            assert response.json()["error"]["code"] == code
    assert Wait.objects.get(pk=wait.pk).status == "open"
    assert SpendScope.objects.get(kind="run", key=str(run.pk)).limit == Decimal("0.001")

    response = post(operator, {"new_limit": "0.01", "reason": "long ticket"})
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "resolved" and response.json()["decision"] == "retry"
    assert SpendScope.objects.get(kind="run", key=str(run.pk)).limit == Decimal("0.01")
    assert drive(run.pk).status == "succeeded"
    again = post(operator, {"new_limit": "0.02", "reason": "again"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_decided"
