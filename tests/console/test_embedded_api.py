"""The REST API on the embedded database (SQLite), in a process of its own: a token's one-query
lookup (its user and the user's permissions, direct and through groups) works there too."""

from __future__ import annotations

import json

from tests.support.embedded import embedded_manage

SCRIPT = """
import json
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.test import Client
from django.utils import timezone
from console.models import ApiToken

users = get_user_model().objects
submitter = users.create_user("submitter")
group = Group.objects.create(name="submitters")
group.permissions.add(Permission.objects.get(codename="add_run"), Permission.objects.get(codename="submit_runs"))
submitter.groups.add(group)
_, submitter_token = ApiToken.issue(submitter, "cli")
_, reader_token = ApiToken.issue(users.create_user("reader"), "cli")
revoked, revoked_token = ApiToken.issue(submitter, "old")
ApiToken.objects.filter(pk=revoked.pk).update(revoked_at=timezone.now())

def submit(raw):
    client = Client(HTTP_AUTHORIZATION="Bearer " + raw)
    body = {"workflow": "reference_workload", "input": {}}
    return client.post("/api/v1/runs", body, content_type="application/json").status_code

print(json.dumps({
    "submitter": submit(submitter_token),
    "reader": submit(reader_token),
    "revoked": submit(revoked_token),
    "unknown": submit("sbx_" + "x" * 43),
    "used": sorted(ApiToken.objects.filter(last_used_at__isnull=False).values_list("name", flat=True)),
}))
"""


def test_token_clients_on_the_embedded_database(tmp_path):
    manage = embedded_manage(tmp_path)

    manage("migrate", "-v0")
    assert (tmp_path / "signalbox.sqlite3").exists()
    outcome = json.loads(manage("shell", stdin=SCRIPT).strip().splitlines()[-1])
    assert outcome == {
        "submitter": 201,  # add_run through a group
        "reader": 403,  # a valid token without the permission
        "revoked": 401,
        "unknown": 401,
        "used": ["cli", "cli"],  # both valid tokens recorded their use; the revoked one did not
    }
