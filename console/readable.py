"""An inbox item's payloads as a person reads them: an action's fields, an input recorded cut
short, a contract error's fields, and what an output contract asks for."""

from __future__ import annotations

import json
from typing import Any


def schema_example(schema: Any) -> str:
    """A skeleton of what a JSON Schema's object asks for (each property with an empty value
    of its type, nested objects filled in from ``$defs``), shown beside the skip form: "" when
    the schema says nothing usable."""
    if not isinstance(schema, dict) or not isinstance(schema.get("properties"), dict):
        return ""
    defs = schema.get("$defs") if isinstance(schema.get("$defs"), dict) else {}
    empty = {"string": "", "integer": 0, "number": 0, "boolean": False, "array": []}

    def example(prop: Any, depth: int) -> Any:
        if not isinstance(prop, dict):
            return None
        if "default" in prop:
            return prop["default"]
        ref = prop.get("$ref") or next(
            (p.get("$ref") for p in prop.get("allOf", []) if isinstance(p, dict)), None
        )
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            prop = defs.get(ref.rsplit("/", 1)[1], {})
        if isinstance(prop.get("properties"), dict):
            if depth >= 3:
                return {}
            return {k: example(v, depth + 1) for k, v in prop["properties"].items()}
        if isinstance(prop.get("enum"), list) and prop["enum"]:
            return prop["enum"][0]
        return empty.get(str(prop.get("type")), {} if prop.get("type") == "object" else None)

    return json.dumps(example(schema, 0), default=str)


def error_fields(error: Any) -> list[dict[str, str]]:
    """A contract error's fields (``detail``: validation errors with ``loc`` and ``msg``), as
    "order.currency: Input should be a valid string" lines; empty for any other error."""
    detail = error.get("detail") if isinstance(error, dict) else None
    if isinstance(detail, dict):  # an error recorded with its payload: {"detail", "payload"}
        detail = detail.get("detail")
    if not isinstance(detail, list):
        return []
    return [
        {
            "field": ".".join(str(part) for part in e.get("loc") or []) or "(the whole value)",
            "message": str(e.get("msg", "invalid")),
        }
        for e in detail[:20]
        if isinstance(e, dict)
    ]


def truncated(value: Any) -> dict[str, Any] | None:
    """A payload recorded cut short (``orchestration.failures.truncate``): its size and head."""
    if (
        isinstance(value, dict)
        and value.get("truncated") is True
        and isinstance(value.get("head"), str)
        and isinstance(value.get("size"), int)
    ):
        return {"size": value["size"], "head": value["head"], "shown": len(value["head"])}
    return None


#: How deep and how many rows :func:`readable_rows` goes before it shows the rest as JSON.
READABLE_DEPTH = 3
READABLE_ROWS = 60


def readable_rows(value: Any) -> list[dict[str, Any]]:
    """An action's input as rows a person reads down: each field with its value, nested
    objects indented under their name, lists and anything deeper as compact JSON. Empty when
    it is not an object (the page shows its JSON instead)."""
    rows: list[dict[str, Any]] = []

    def walk(obj: dict[str, Any], depth: int) -> None:
        for key in sorted(obj):
            if len(rows) >= READABLE_ROWS:
                return
            item = obj[key]
            label = str(key).replace("_", " ")
            if isinstance(item, dict) and item and depth < READABLE_DEPTH:
                rows.append({"label": label, "depth": depth, "value": None})
                walk(item, depth + 1)
            elif isinstance(item, (dict, list)):
                text = json.dumps(item, sort_keys=True, default=str)
                rows.append({"label": label, "depth": depth, "value": text, "code": True})
            else:
                text = (
                    "—"
                    if item is None
                    else str(item).lower()
                    if isinstance(item, bool)
                    else str(item)
                )
                rows.append({"label": label, "depth": depth, "value": text, "code": False})

    if isinstance(value, dict):
        walk(value, 0)
    return rows
