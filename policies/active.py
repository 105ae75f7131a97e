"""The policy in force, compiled once per version and cached in each process.

Deciding an action must cost microseconds, so the engine never reads the policy per decision: it
asks :func:`active_policy`, which returns the compiled active version and looks again at which
version is active at most every :data:`RECHECK_SECONDS` (one indexed read). An activation in this
process is seen at once (:func:`active_forget` after its commit); in another process within that
bound. Every decision records the version that made it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from django.conf import settings

from policies.document import Bounds, PolicyDocument
from policies.evaluate import CompiledPolicy, compile_policy
from policies.limits import bounds_for
from policies.models import Policy, PolicyVersion

#: How stale the knowledge of which version is active may get, at most (seconds).
RECHECK_SECONDS = 1.0


@dataclass(frozen=True)
class ActivePolicy:
    """A compiled version in force: what to decide with, and which row to cite."""

    compiled: CompiledPolicy
    version_id: int
    number: int
    policy: str
    _bounds: dict[str, Bounds] = field(default_factory=dict, compare=False, repr=False)

    def bounds(self, workflow: str) -> Bounds:
        """The policy's bounds on ``workflow``'s runs (worked out once per workflow)."""
        found = self._bounds.get(workflow)
        if found is None:
            found = self._bounds[workflow] = bounds_for(self.compiled, workflow)
        return found


_lock = threading.Lock()
_checked_at = 0.0
_current: ActivePolicy | None = None
_compiled: dict[int, ActivePolicy] = {}


def policy_name() -> str:
    return str(settings.SIGNALBOX.get("POLICY", "default"))


def active_policy() -> ActivePolicy | None:
    """The active version of the enforced policy, compiled; None when none is active (nothing
    is enforced then: a deployment is warned by its system checks)."""
    global _checked_at, _current
    now = time.monotonic()
    if now - _checked_at < RECHECK_SECONDS:
        return _current
    version_id = (
        Policy.objects.filter(name=policy_name())
        .values_list("active_version_id", flat=True)
        .first()
    )
    found = None
    if version_id is not None:
        found = _compiled.get(version_id)
        if found is None:
            version = PolicyVersion.objects.select_related("policy").get(pk=version_id)
            document = PolicyDocument.model_validate(version.document)
            found = ActivePolicy(
                compile_policy(document, version=version.number),
                version.pk,
                version.number,
                version.policy.name,
            )
            with _lock:
                _compiled[version_id] = found
    with _lock:
        _current, _checked_at = found, now
    return found


def active_forget() -> None:
    """Look again at the next decision (an activation committed; a test's database emptied)."""
    global _checked_at, _current
    with _lock:
        _checked_at, _current = 0.0, None
        _compiled.clear()
