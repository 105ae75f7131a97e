"""Source text (YAML or JSON) read into plain values, with where each value was in the text.

``policies.source`` validates the values and uses the positions to say at which line (and
column) each problem is. Values are built here rather than by PyYAML's constructor because
YAML 1.1 reads ``20:00`` as the number 1200 and ``no``/``off`` as false; here a plain scalar is
a string unless it is ``true``/``false``, ``null``/``~``, an integer or a decimal number
(digits may be grouped with ``_``: ``10_000``), as in YAML 1.2. Every number with a fraction
becomes a ``Decimal``, so money stays exact. Duplicate keys are errors, not silently dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import yaml

from policies.document import Location

INTEGER = re.compile(r"[-+]?(0|[1-9][0-9]*(_[0-9]+)*)")
DECIMAL = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(_[0-9]+)*(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
NULLS = ("", "~", "null", "Null", "NULL")
TRUES = ("true", "True", "TRUE")
FALSES = ("false", "False", "FALSE")
# Aliases can expand a small text into a huge tree ("billion laughs"); a policy never needs this many.
MAX_VALUES = 200_000


@dataclass(frozen=True, slots=True)
class Position:
    """A place in the source text, both 1-based."""

    line: int
    column: int | None = None


@dataclass
class Located:
    """The values read from a source, and where each one (and each mapping key) starts."""

    value: Any = None
    positions: dict[Location, Position] = field(default_factory=dict)
    key_positions: dict[Location, Position] = field(default_factory=dict)

    def position(self, loc: Location, *, key: bool = False) -> Position:
        """Where ``loc`` is, or its nearest enclosing value that exists (a missing field is
        reported at the mapping that lacks it)."""
        if key and loc in self.key_positions:
            return self.key_positions[loc]
        for end in range(len(loc), -1, -1):
            found = self.positions.get(loc[:end])
            if found is not None:
                return found
        return Position(1, 1)


class SourceSyntaxError(ValueError):
    """The text is not well-formed YAML or JSON (or has a duplicate key)."""

    def __init__(self, message: str, position: Position, path: Location = ()) -> None:
        super().__init__(message)
        self.message = message
        self.position = position
        self.path = path


def plain_scalar(text: str) -> Any:
    """A plain (unquoted) YAML scalar's value, by YAML 1.2's core rules plus ``_`` grouping."""
    if text in NULLS:
        return None
    if text in TRUES:
        return True
    if text in FALSES:
        return False
    if INTEGER.fullmatch(text):
        return int(text.replace("_", ""))
    if DECIMAL.fullmatch(text):
        return Decimal(text.replace("_", ""))
    return text


def yaml_read(text: str) -> Located:
    """Read a YAML source (one document) with positions; SourceSyntaxError if it is not YAML."""
    try:
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Position(mark.line + 1, mark.column + 1) if mark else Position(1)
        problem = " ".join(part for part in (exc.context, exc.problem) if part)
        raise SourceSyntaxError(f"not valid YAML: {_plain_words(problem)}", where) from None
    except yaml.YAMLError as exc:
        raise SourceSyntaxError(f"not valid YAML: {exc}", Position(1)) from None
    if len(documents) > 1:
        # Point at the separator that starts the second document, not at its content.
        lines = text.splitlines()[: documents[1].start_mark.line + 1]
        separator = max((n for n, line in enumerate(lines) if line.startswith("---")), default=0)
        raise SourceSyntaxError(
            "one document expected, found several (remove the '---' separators)",
            Position(separator + 1, 1),
        )
    located = Located()
    if documents and documents[0] is not None:
        builder = _YamlBuilder(located)
        located.value = builder.build(documents[0], ())
    return located


# PyYAML's wording for the mistakes people make most, in words an admin can act on.
_YAML_PROBLEMS = (
    ("'\\t' that cannot start any token", "a tab: indent with spaces"),
    ("expected <block end>, but found", "the indentation does not line up with the lines above"),
    (
        "mapping values are not allowed here",
        "an unexpected ':' (put quotes around a value that contains ': ')",
    ),
    ("while parsing a flow sequence", "a '[' list is not closed with ']'"),
    ("while parsing a flow mapping", "a '{' mapping is not closed with '}'"),
    ("while scanning a quoted scalar", "a quoted text is not closed"),
    ("could not find expected ':'", "a line without 'name: value' where one was expected"),
)


def _plain_words(problem: str) -> str:
    for pyyaml_words, words in _YAML_PROBLEMS:
        if pyyaml_words in problem:
            return words
    return problem


def _mark(node: yaml.Node) -> Position:
    return Position(node.start_mark.line + 1, node.start_mark.column + 1)


class _YamlBuilder:
    def __init__(self, located: Located) -> None:
        self.located = located
        self.count = 0

    def build(self, node: yaml.Node, loc: Location) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            raise SourceSyntaxError(
                f"the document has more than {MAX_VALUES} values", _mark(node), loc
            )
        self.located.positions.setdefault(loc, _mark(node))
        if isinstance(node, yaml.ScalarNode):
            # Quoted and block scalars are always strings; only plain ones are resolved.
            return plain_scalar(node.value) if node.style is None else node.value
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*loc, index)) for index, item in enumerate(node.value)]
        assert isinstance(node, yaml.MappingNode)
        mapping: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise SourceSyntaxError(
                    "a key must be a plain name, not a list or a mapping", _mark(key_node), loc
                )
            key = key_node.value
            if key == "<<":
                raise SourceSyntaxError(
                    "merge keys ('<<') are not supported: write the fields out",
                    _mark(key_node),
                    loc,
                )
            if key in mapping:
                raise SourceSyntaxError(f"duplicate key {key!r}", _mark(key_node), (*loc, key))
            self.located.key_positions[(*loc, key)] = _mark(key_node)
            # A scalar is reported where it stands; a nested block where its key is.
            if not isinstance(value_node, yaml.ScalarNode):
                self.located.positions[(*loc, key)] = _mark(key_node)
            mapping[key] = self.build(value_node, (*loc, key))
        return mapping


# --- JSON ---------------------------------------------------------------------------------------

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def json_read(text: str) -> Located:
    """Read a JSON source with positions; SourceSyntaxError (with line and column) if it is not
    JSON. Python's own parser judges the syntax; a small reader then finds the positions."""
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceSyntaxError(
            f"not valid JSON: {exc.msg}", Position(exc.lineno, exc.colno)
        ) from None
    except RecursionError:
        raise SourceSyntaxError("not valid JSON: nested too deeply", Position(1)) from None
    reader = _JsonReader(text)
    located = Located()
    reader.located = located
    index = reader.skip(0)
    located.value, _ = reader.read(index, ())
    return located


class _JsonReader:
    """Reads JSON that ``json.loads`` accepted, noting where each value and key starts."""

    located: Located

    def __init__(self, text: str) -> None:
        self.text = text
        # Line starts, to turn an offset into a line and a column.
        self.line_starts = [0] + [match.end() for match in re.finditer("\n", text)]

    def position(self, index: int) -> Position:
        low, high = 0, len(self.line_starts) - 1
        while low < high:
            middle = (low + high + 1) // 2
            if self.line_starts[middle] <= index:
                low = middle
            else:
                high = middle - 1
        return Position(low + 1, index - self.line_starts[low] + 1)

    def skip(self, index: int) -> int:
        match = _WHITESPACE.match(self.text, index)
        assert match is not None
        return match.end()

    def read(self, index: int, loc: Location) -> tuple[Any, int]:
        self.located.positions.setdefault(loc, self.position(index))
        char = self.text[index]
        if char == "{":
            return self.read_object(index, loc)
        if char == "[":
            items: list[Any] = []
            index = self.skip(index + 1)
            if self.text[index] == "]":
                return items, index + 1
            while True:
                value, index = self.read(index, (*loc, len(items)))
                items.append(value)
                index = self.skip(index)
                if self.text[index] == "]":
                    return items, index + 1
                index = self.skip(index + 1)  # the comma
        if char == '"':
            return json.decoder.scanstring(self.text, index + 1)  # type: ignore[attr-defined, no-any-return]  # typeshed does not declare json.decoder.scanstring (the C scanner json itself uses)
        for word, value in (("true", True), ("false", False), ("null", None)):
            if self.text.startswith(word, index):
                return value, index + len(word)
        match = _NUMBER.match(self.text, index)
        assert match is not None
        number = match.group()
        is_integer = match.group(2) is None and match.group(3) is None
        return (int(number) if is_integer else Decimal(number)), match.end()

    def read_object(self, index: int, loc: Location) -> tuple[dict[str, Any], int]:
        mapping: dict[str, Any] = {}
        index = self.skip(index + 1)
        if self.text[index] == "}":
            return mapping, index + 1
        while True:
            key_at = self.position(index)
            key, index = json.decoder.scanstring(self.text, index + 1)  # type: ignore[attr-defined]  # as above: undeclared in typeshed
            if key in mapping:
                raise SourceSyntaxError(f"duplicate key {key!r}", key_at, (*loc, key))
            self.located.key_positions[(*loc, key)] = key_at
            index = self.skip(self.skip(index) + 1)  # the colon
            if self.text[index] in "{[":
                self.located.positions[(*loc, key)] = key_at
            mapping[key], index = self.read(index, (*loc, key))
            index = self.skip(index)
            if self.text[index] == "}":
                return mapping, index + 1
            index = self.skip(index + 1)  # the comma
