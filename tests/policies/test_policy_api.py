"""The policy REST API (issue 18, "REST endpoints" and "Editing, review and simulation"): a draft
with an error is refused with its line; review flow to active; four eyes; rollback; diff; a
simulation on a crafted history; auditors read but never write; the version list's query count."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from audit.models import AuditEvent
from audit.verbs import Verb
from console.models import ApiToken
from orchestration.schemas import ErrorOut as EngineErrorOut
from policies.api import ErrorOut as PolicyErrorOut
from policies.facts import Facts
from policies.models import Policy, PolicyStatus, PolicyVersion
from policies.roles import roles_sync
from tests.factories import PolicyDecisionFactory, UserFactory
from tests.policies.documents import REFUND_TIER_1 as V1
from tests.policies.documents import REFUND_TIER_2_ADDED as V2
from tests.policies.documents import REFUND_TIER_7 as BROKEN
from tests.policies.documents import REFUND_TIER_7_LINE

pytestmark = pytest.mark.django_db

BASE = "/api/v1/policies"


def _in_group(name: str, username: str) -> Any:
    groups = roles_sync()
    user = UserFactory(username=username)
    user.groups.add(groups[name])
    return user


def _client(user: Any) -> Client:
    _, raw = ApiToken.issue(user, "tests")
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}")


@pytest.fixture
def ada() -> Any:
    return _in_group("Policy admin", "ada")


@pytest.fixture
def bob() -> Any:
    return _in_group("Policy admin", "bob")


@pytest.fixture
def auditor() -> Any:
    return _in_group("Auditor", "audrey")


def _draft(client: Client, source: str, note: str = "why") -> dict[str, Any]:
    response = client.post(
        f"{BASE}/default/versions",
        {"source": source, "note": note},
        content_type="application/json",
    )
    assert response.status_code == 201, response.content
    return response.json()


def _post(client: Client, path: str, body: dict[str, Any] | None = None) -> Any:
    return client.post(f"{BASE}{path}", body or {}, content_type="application/json")


def _live(author: Client, reviewer: Client, source: str) -> dict[str, Any]:
    version = _draft(author, source)
    assert _post(author, f"/versions/{version['id']}/submit").status_code == 200
    assert (
        _post(
            reviewer, f"/versions/{version['id']}/review", {"approve": True, "note": "ok"}
        ).status_code
        == 200
    )
    response = _post(reviewer, f"/versions/{version['id']}/activate", {"note": "go"})
    assert response.status_code == 200, response.content
    return response.json()


def test_a_draft_with_an_error_is_refused_with_its_field_line_and_column(ada: Any) -> None:
    response = _post(_client(ada), "/default/versions", {"source": BROKEN})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "policy_invalid"
    [problem] = error["detail"]
    assert problem["line"] == REFUND_TIER_7_LINE and problem["path"] == "rules[0].outcome.tier"
    assert problem["column"] is not None and "1" in problem["message"]
    assert not PolicyVersion.objects.exists()  # nothing to submit


def test_a_draft_goes_through_review_to_active_with_who_and_why(ada: Any, bob: Any) -> None:
    author, reviewer = _client(ada), _client(bob)
    version = _draft(author, V1, note="refunds need a person")
    assert version["status"] == "draft" and version["author"] == "ada" and version["number"] == 1
    assert _post(author, f"/versions/{version['id']}/submit").json()["status"] == "submitted"
    reviewed = _post(
        reviewer, f"/versions/{version['id']}/review", {"approve": True, "note": "checked"}
    ).json()
    assert reviewed["status"] == "approved" and reviewed["reviewed_by"] == "bob"
    active = _post(reviewer, f"/versions/{version['id']}/activate").json()
    assert active["status"] == "active" and active["activated_by"] == "bob"

    detail = author.get(f"{BASE}/versions/{version['id']}").json()
    assert detail["source"] == V1 and detail["document"]["rules"][0]["id"] == "refund-tier-1"
    assert (
        detail["rules"][0]["summary"]
        == "agent:refund_executor when params.amount > 100: require_approval tier 1, sla 1d"
    )
    assert [(entry["verb"], entry["actor"]) for entry in detail["history"]] == [
        ("drafted", "ada"),
        ("submitted", "ada"),
        ("approved", "bob"),
        ("activated", "bob"),
    ]
    assert detail["history"][0]["note"] == "refunds need a person"
    [policy] = author.get(f"{BASE}/").json()
    assert policy == {
        "name": "default",
        "description": "",
        "active_version_id": version["id"],
        "active_version": 1,
        "version_count": 1,
    }


def test_four_eyes_the_author_can_neither_approve_nor_activate(ada: Any, bob: Any) -> None:
    author = _client(ada)
    version = _draft(author, V1)
    _post(author, f"/versions/{version['id']}/submit")
    refused = _post(author, f"/versions/{version['id']}/review", {"approve": True})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "policy_four_eyes"
    _post(_client(bob), f"/versions/{version['id']}/review", {"approve": True})
    refused = _post(author, f"/versions/{version['id']}/activate")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "policy_four_eyes"
    assert PolicyVersion.objects.get(pk=version["id"]).status == PolicyStatus.APPROVED


def test_a_rejection_needs_a_note(ada: Any, bob: Any) -> None:
    version = _draft(_client(ada), V1)
    _post(_client(ada), f"/versions/{version['id']}/submit")
    refused = _post(
        _client(bob), f"/versions/{version['id']}/review", {"approve": False, "note": " "}
    )
    assert (
        refused.status_code == 422 and refused.json()["error"]["code"] == "policy_reason_required"
    )
    rejected = _post(
        _client(bob), f"/versions/{version['id']}/review", {"approve": False, "note": "too strict"}
    )
    assert (
        rejected.json()["status"] == "rejected" and rejected.json()["review_note"] == "too strict"
    )


def test_rollback_puts_the_earlier_version_back_in_force(ada: Any, bob: Any) -> None:
    first = _live(_client(ada), _client(bob), V1)
    second = _live(_client(ada), _client(bob), V2)
    assert PolicyVersion.objects.get(pk=first["id"]).status == PolicyStatus.RETIRED
    no_reason = _post(_client(bob), f"/versions/{first['id']}/rollback", {"reason": ""})
    assert no_reason.status_code == 422
    not_retired = _post(_client(bob), f"/versions/{second['id']}/rollback", {"reason": "x"})
    assert (
        not_retired.status_code == 409
        and not_retired.json()["error"]["code"] == "policy_not_retired"
    )
    rolled = _post(
        _client(bob), f"/versions/{first['id']}/rollback", {"reason": "v2 blocks the desk"}
    )
    assert rolled.status_code == 200 and rolled.json()["status"] == "active"
    assert Policy.objects.get(name="default").active_version_id == first["id"]
    assert PolicyVersion.objects.get(pk=second["id"]).status == PolicyStatus.RETIRED
    history = _client(bob).get(f"{BASE}/versions/{first['id']}").json()["history"]
    assert (
        history[-1]["verb"] == "activated" and history[-1]["note"] == "rollback: v2 blocks the desk"
    )


def test_diff_between_two_versions_names_the_added_rule(ada: Any, auditor: Any) -> None:
    first, second = _draft(_client(ada), V1), _draft(_client(ada), V2)
    response = _client(auditor).get(
        f"{BASE}/diff", {"from_version": first["id"], "to_version": second["id"]}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["changes"] == [
        "rule refund-tier-2 added: agent:refund_executor when params.amount > 50: require_approval tier 2, sla 1d"
    ]
    assert (
        body["unified"].startswith("--- v1\n+++ v2\n")
        and "+  - id: refund-tier-2" in body["unified"]
    )


def _refund(amount: float) -> dict[str, Any]:
    return Facts(
        "agent:refund_executor", workflow="refund_desk", tenant="acme", params={"amount": amount}
    ).to_json()


def test_simulation_on_a_crafted_history_gives_exactly_the_expected_changes(
    ada: Any, bob: Any, auditor: Any
) -> None:
    _live(_client(ada), _client(bob), V1)
    draft = _draft(_client(ada), V2)
    now = timezone.now()
    for n in range(37):  # auto-approved refunds of 60: the draft wants tier 2
        PolicyDecisionFactory(
            facts=_refund(60), run_id=1000 + n, created_at=now - timedelta(hours=n + 1)
        )
    for n in range(3):  # tier-1 refunds of 250: the draft wants tier 2
        PolicyDecisionFactory(
            facts=_refund(250),
            outcome="approve",
            tier=1,
            rule="refund-tier-1",
            run_id=2000 + n,
            created_at=now - timedelta(days=1, hours=n),
        )
    for _ in range(2):  # small refunds: unchanged
        PolicyDecisionFactory(facts=_refund(20), created_at=now - timedelta(days=2))
    # Older than the window: not replayed.
    PolicyDecisionFactory(facts=_refund(60), created_at=now - timedelta(days=8))

    response = _client(auditor).get(
        f"{BASE}/versions/{draft['id']}/simulation", {"days": 7, "examples": 2}
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["total"], body["changed"], body["baseline_version"]) == (42, 40, 1)
    assert body["current_outcomes"] == {"allow": 39, "require_approval tier 1": 3}
    assert body["draft_outcomes"] == {"allow": 2, "require_approval tier 2": 40}
    assert {r["rule"]: (r["current"], r["draft"]) for r in body["rules"]} == {
        "default": (39, 2),
        "refund-tier-1": (3, 0),
        "refund-tier-2": (0, 40),
    }
    first, second = body["changes"]
    assert (first["before"], first["after"], first["count"]) == (
        "allow",
        "require_approval tier 2",
        37,
    )
    assert first["sentence"] == (
        "37 agent:refund_executor actions that were allowed would require a tier-2 approval (rule refund-tier-2)"
    )
    # Examples are the earliest in the window, with the run they belong to.
    assert [example["run_id"] for example in first["examples"]] == [1036, 1035]
    assert (second["before"], second["after"], second["count"]) == (
        "require_approval tier 1",
        "require_approval tier 2",
        3,
    )
    assert (
        second["examples"][0]["run_id"] == 2002
        and second["examples"][0]["draft_rule"] == "refund-tier-2"
    )


def test_simulation_refuses_days_out_of_range(ada: Any) -> None:
    draft = _draft(_client(ada), V1)
    response = _client(ada).get(f"{BASE}/versions/{draft['id']}/simulation", {"days": 0})
    assert response.status_code == 422


def test_an_auditor_reads_but_cannot_write(ada: Any, auditor: Any) -> None:
    version = _draft(_client(ada), V1)
    reader = _client(auditor)
    assert reader.get(f"{BASE}/versions/{version['id']}").status_code == 200
    for path, body in (
        ("/default/versions", {"source": V1}),
        (f"/versions/{version['id']}/submit", {}),
        (f"/versions/{version['id']}/review", {"approve": True}),
        (f"/versions/{version['id']}/activate", {}),
        (f"/versions/{version['id']}/rollback", {"reason": "x"}),
    ):
        response = _post(reader, path, body)
        assert response.status_code == 403, path
        assert response.json()["error"]["code"] in ("policy_edit_denied", "policy_review_denied")
    assert PolicyVersion.objects.get().status == PolicyStatus.DRAFT


def test_an_operator_cannot_read_policies() -> None:
    operator = _in_group("Operator tier 3", "otto")
    response = _client(operator).get(f"{BASE}/")
    assert response.status_code == 403 and response.json()["error"]["code"] == "policy_read_denied"
    denial = AuditEvent.objects.get(verb=Verb.ACCESS_DENIED)
    assert denial.actor_id == "otto" and denial.data["code"] == "policy_read_denied"


def test_the_version_list_pages_with_a_fixed_number_of_queries(
    ada: Any, auditor: Any, django_assert_num_queries: Any
) -> None:
    for _ in range(5):
        _draft(_client(ada), V1)
    reader = _client(auditor)
    reader.get(f"{BASE}/")  # a token's first use is recorded once; not part of the page's cost
    # The token with its user and permissions, the policy, the page of versions with their people.
    with django_assert_num_queries(3):
        page = reader.get(f"{BASE}/default/versions", {"limit": 2}).json()
    assert [v["number"] for v in page["items"]] == [5, 4] and page["next_before"] == 4
    for _ in range(10):
        _draft(_client(ada), V1)
    with django_assert_num_queries(3):
        page = reader.get(f"{BASE}/default/versions", {"limit": 20}).json()
    assert len(page["items"]) == 15 and page["next_before"] is None
    older = reader.get(f"{BASE}/default/versions", {"before": 4, "limit": 10}).json()
    assert [v["number"] for v in older["items"]] == [3, 2, 1]


def test_an_unknown_policy_or_version_is_a_404(auditor: Any) -> None:
    reader = _client(auditor)
    assert reader.get(f"{BASE}/nope/versions").json()["error"]["code"] == "policy_not_found"
    assert reader.get(f"{BASE}/versions/999").status_code == 404


def test_a_source_with_a_nul_character_is_refused(ada: Any) -> None:
    response = _post(_client(ada), "/default/versions", {"source": "default: allow\x00"})
    assert response.status_code == 422


def test_policy_errors_have_the_api_s_one_error_shape() -> None:
    assert PolicyErrorOut.model_json_schema() == EngineErrorOut.model_json_schema()


def test_a_policy_named_versions_is_reached_by_its_own_paths(ada: Any) -> None:
    # "/versions/versions" is that policy's versions, not a version whose id is "versions"
    client = _client(ada)
    response = _post(client, "/versions/versions", {"source": V1, "note": "a name like a path"})
    assert response.status_code == 201, response.content
    version = response.json()
    listed = client.get(f"{BASE}/versions/versions")
    assert listed.status_code == 200
    assert [item["id"] for item in listed.json()["items"]] == [version["id"]]
    assert client.get(f"{BASE}/versions/{version['id']}").json()["id"] == version["id"]
