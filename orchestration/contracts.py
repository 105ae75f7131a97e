"""How a contract's refusal is reported: one shape for pydantic's errors, wherever they arise
(an API request, a run's input, an agent's input or output, a tool's parameters or result)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError


def validation_errors(exc: ValidationError | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each error as ``{"loc": [...], "msg": ..., "type": ...}``.

    Only these three: pydantic's ``input`` echoes the payload (which may be huge or hold
    secrets) and its ``ctx`` can hold exception objects that do not serialise. Accepts a
    pydantic ``ValidationError`` or its error list as another library passes it on (ninja)."""
    errors = (
        exc.errors(include_url=False, include_context=False, include_input=False)
        if isinstance(exc, ValidationError)
        else exc
    )
    return [
        {
            "loc": list(error.get("loc", ())),
            "msg": error.get("msg", ""),
            "type": error.get("type", ""),
        }
        for error in errors
    ]
