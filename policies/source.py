"""Reading what an admin wrote (YAML or JSON) into a :class:`PolicyDocument`, and writing a
document back as canonical YAML.

``policy_source_parse(text)`` returns a valid document or raises :class:`PolicySourceError`
listing every problem with its field path and its line (and column) in the text, e.g.
``line 14: rules[2].outcome.tier: must be 1, 2 or 3``; a document with an error is never
returned. ``policy_source_problems(text)`` gives the same list without raising, for an editor.
``policy_source_render(document)`` writes the canonical YAML: fixed key order, no comments,
empty and unset fields left out, so two renderings differ only where the documents do.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from policies.document import DocumentProblems, Location, PolicyDocument, path_text
from policies.errors import Code
from policies.located import (
    Located,
    Position,
    SourceSyntaxError,
    json_read,
    plain_scalar,
    yaml_read,
)

MAX_SOURCE_CHARACTERS = 1_000_000
OUTCOME_TAGS = frozenset({"allow", "deny", "require_approval", "defer"})
CONDITION_TAGS = frozenset({"fact", "window"})
# Written as one word rather than a list of one: `action: tool:send_email`.
ONE_OR_MANY_KEYS = frozenset({"action", "workflow", "tenant", "fact"})


@dataclass(frozen=True, slots=True)
class SourceProblem:
    """One problem in a source text: where it is (1-based line and column), which field, what."""

    line: int
    column: int | None
    path: str
    message: str

    def __str__(self) -> str:
        return (
            f"line {self.line}: {self.path}: {self.message}"
            if self.path
            else f"line {self.line}: {self.message}"
        )

    def to_json(self) -> dict[str, Any]:
        """For the editor: ``{"line", "column", "path", "message"}``."""
        return {
            "line": self.line,
            "column": self.column,
            "path": self.path,
            "message": self.message,
        }


class PolicySourceError(ValueError):
    """A policy source that is not a valid document; ``problems`` lists each problem in order."""

    code = Code.INVALID_SOURCE

    def __init__(self, problems: list[SourceProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(problem) for problem in problems))


def policy_source_parse(
    text: str, *, format: Literal["yaml", "json"] | None = None
) -> PolicyDocument:
    """The document a YAML or JSON source describes (JSON if it starts with ``{``, unless
    ``format`` says); PolicySourceError with every problem, located, if it has any."""
    if len(text) > MAX_SOURCE_CHARACTERS:
        raise PolicySourceError(
            [
                SourceProblem(
                    1, None, "", f"the source is longer than {MAX_SOURCE_CHARACTERS} characters"
                )
            ]
        )
    kind = format or ("json" if text.lstrip().startswith("{") else "yaml")
    try:
        located = json_read(text) if kind == "json" else yaml_read(text)
    except SourceSyntaxError as exc:
        problem = SourceProblem(
            exc.position.line, exc.position.column, path_text(exc.path), exc.message
        )
        raise PolicySourceError([problem]) from None
    if not isinstance(located.value, dict):
        what = (
            "empty" if located.value is None else f"a {type(located.value).__name__}, not a mapping"
        )
        raise PolicySourceError(
            [
                SourceProblem(
                    1,
                    1,
                    "",
                    f"the document is {what}: it needs at least 'default: allow' or 'default: deny'",
                )
            ]
        )
    try:
        return PolicyDocument.model_validate(located.value)
    except ValidationError as exc:
        raise PolicySourceError(_problems(exc, located)) from None


def policy_source_problems(
    text: str, *, format: Literal["yaml", "json"] | None = None
) -> list[SourceProblem]:
    """Every problem in a source, located; empty when it is a valid document."""
    try:
        policy_source_parse(text, format=format)
    except PolicySourceError as exc:
        return exc.problems
    return []


def _problems(error: ValidationError, located: Located) -> list[SourceProblem]:
    problems: list[SourceProblem] = []
    for item in error.errors(include_url=False):
        loc = _as_written(_without_union_tags(tuple(item["loc"])), located.value)
        is_key = bool(loc) and loc[-1] == "[key]"
        if is_key:
            loc = loc[:-1]
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, DocumentProblems):
            for sub_loc, message in cause.problems:
                problems.append(_located(located, (*loc, *sub_loc), message))
            continue
        message, loc = _message(item, loc, is_key)
        problems.append(
            _located(located, loc, message, key=is_key or item["type"] == "extra_forbidden")
        )
    problems.sort(key=lambda problem: (problem.line, problem.column or 0))
    return problems


def _located(located: Located, loc: Location, message: str, *, key: bool = False) -> SourceProblem:
    position: Position = located.position(loc, key=key)
    return SourceProblem(position.line, position.column, path_text(loc), message)


def _without_union_tags(loc: Location) -> Location:
    # pydantic names the branch of a tagged union in the path (outcome.require_approval.tier);
    # the source has no such level, so it is dropped to match the text.
    kept: list[str | int] = []
    for index, part in enumerate(loc):
        previous = loc[index - 1] if index >= 1 else None
        after_outcome = previous in ("outcome", "outside") and part in OUTCOME_TAGS
        after_condition = (
            index >= 2
            and loc[index - 2] == "when"
            and isinstance(previous, int)
            and part in CONDITION_TAGS
        )
        if not (after_outcome or after_condition):
            kept.append(part)
    return tuple(kept)


def _as_written(loc: Location, value: Any) -> Location:
    # A single name written without brackets is validated as a list of one: `fact[0]` in the
    # error path would point at brackets the author never wrote.
    for index, part in enumerate(loc):
        if isinstance(value, dict) and part in value:
            value = value[part]
            continue
        if isinstance(value, list) and isinstance(part, int) and part < len(value):
            value = value[part]
            continue
        if isinstance(value, str) and part == 0 and index == len(loc) - 1:
            return loc[:index]
        break
    return loc


def _message(item: Any, loc: Location, is_key: bool) -> tuple[str, Location]:
    kind, message, ctx = item["type"], item["msg"], item.get("ctx") or {}
    if kind == "missing":
        return "required", loc
    if kind == "extra_forbidden":
        name = str(loc[-1]) if loc else ""
        close = difflib.get_close_matches(name, _field_names(), n=1, cutoff=0.75)
        return "unknown field" + (f" (did you mean {close[0]!r}?)" if close else ""), loc
    if kind == "union_tag_invalid":
        tags = ctx.get("expected_tags", "").replace("'", "")
        return f"must be one of {tags} (got {ctx.get('tag')!r})", (*loc, "decision")
    if kind == "union_tag_not_found":
        return "needs decision: allow, deny, require_approval or defer", loc
    if kind == "literal_error":
        return f"must be {ctx.get('expected', '').replace(chr(39), '')}", loc
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "must be a mapping (name: value lines)", loc
    if kind == "list_type":
        return "must be a list", loc
    if kind == "string_pattern_mismatch" and loc and loc[-1] == "currency":
        return "must be a three-letter currency code such as USD or EUR", loc
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
    if is_key:
        message = f"the name {loc[-1]!r} {message}" if loc else message
    for prefix, replacement in (
        ("Input should be", "must be"),
        ("String should", "must"),
        ("List should", "must"),
        ("Dictionary should", "must"),
        ("Decimal input should", "must"),
        ("Value should", "must"),
    ):
        if message.startswith(prefix):
            message = replacement + message[len(prefix) :]
            break
    return message, loc


def _field_names() -> list[str]:
    names: set[str] = set()
    pending: list[type[BaseModel]] = [PolicyDocument]
    seen: set[type[BaseModel]] = set()
    while pending:
        model = pending.pop()
        if model in seen:
            continue
        seen.add(model)
        names.update(model.model_fields)
        pending.extend(_models_in(model))
    return sorted(names)


def _models_in(model: type[BaseModel]) -> list[type[BaseModel]]:
    found: list[type[BaseModel]] = []
    stack: list[Any] = [info.annotation for info in model.model_fields.values()]
    while stack:
        annotation = stack.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.append(annotation)
        stack.extend(typing.get_args(annotation))
    return found


# --- rendering ----------------------------------------------------------------------------------


def policy_source_render(document: PolicyDocument) -> str:
    """The canonical YAML of a document; parsing it gives the same document back."""
    data = _simplified(document.model_dump(mode="python", exclude_none=True), ())
    return yaml.dump(data, Dumper=_CanonicalDumper, sort_keys=False, allow_unicode=True, width=100)


def _simplified(value: Any, loc: Location) -> Any:
    if isinstance(value, dict):
        return {
            key: _simplified(item, (*loc, key))
            for key, item in value.items()
            # Empty text and empty collections are every field's default: leaving them out
            # keeps the canonical text to what the author actually set.
            if not ((isinstance(item, list | dict) and not item) or item == "")
        }
    if isinstance(value, list):
        if loc and loc[-1] in ONE_OR_MANY_KEYS and len(value) == 1:
            return value[0]
        return [_simplified(item, (*loc, index)) for index, item in enumerate(value)]
    return value


class _CanonicalDumper(yaml.SafeDumper):
    """Quotes exactly the strings that would read back as something else (by
    :func:`policies.located.plain_scalar`'s rules, not YAML 1.1's), and never writes aliases."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode and implicit[0]:
            read = plain_scalar(value)
            if read is None:
                return "tag:yaml.org,2002:null"
            if isinstance(read, bool):
                return "tag:yaml.org,2002:bool"
            if isinstance(read, int):
                return "tag:yaml.org,2002:int"
            if isinstance(read, Decimal):
                return "tag:yaml.org,2002:float"
            return "tag:yaml.org,2002:str"
        return super().resolve(kind, value, implicit)  # type: ignore[no-untyped-call]  # PyYAML's stubs leave it untyped

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        # Items of a block list are indented under their key, as most YAML is written.
        super().increase_indent(flow, False)

    def represent_list(self, data: Any) -> yaml.SequenceNode:
        # A list of plain values reads best on one line: `days: [mon, tue, wed]`.
        flow = all(not isinstance(item, list | dict) for item in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_decimal(dumper: yaml.representer.SafeRepresenter, value: Decimal) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:float", format(value, "f"))


_CanonicalDumper.add_representer(Decimal, _represent_decimal)
_CanonicalDumper.add_representer(list, _CanonicalDumper.represent_list)
