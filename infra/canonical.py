"""One canonical JSON form and its digest, for anything that must hash the same everywhere:
an approval bound to the exact action it approved, an audit row's payload, a request body seen
again under the same idempotency key."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8; values JSON does not know are written as their ``str``."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def digest(value: Any) -> str:
    """SHA-256 of the canonical JSON of ``value``, as hex."""
    return hashlib.sha256(canonical_json(value)).hexdigest()
