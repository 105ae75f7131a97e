"""How a fact's value compares with a rule's operand: the plain definitions, pure functions
of the value (``policies.conditions`` folds the common cases into its fast checks).

None means "cannot be compared": a string where a number is expected, NaN, a malformed
address. Numbers: a float is compared with the threshold as a float (so ``100.1 >= 100.1``
holds as anyone reading the rule expects); ints, Decimals and numeric strings exactly.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

from policies.document import Allowlist

ORDERING: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


def as_number(value: Any) -> float | int | Decimal | None:
    """A fact as a number to compare, or None if it is not one (bools are not numbers)."""
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is int or kind is Decimal:
        return value if kind is int or value.is_finite() else None
    if kind is str:
        try:
            number = Decimal(value.strip().replace("_", ""))
        except InvalidOperation:
            return None
        return number if number.is_finite() else None
    return None


def value_text(value: Any) -> str:
    """An operand as a rule is read: ``1000``, ``[EUR, USD]``."""
    if isinstance(value, list):
        return "[" + ", ".join(str(item) for item in value) + "]"
    return str(value)


def negate(test: Callable[[Any], bool | None]) -> Callable[[Any], bool | None]:
    """The opposite test; "cannot be compared" stays so."""

    def negated(value: Any) -> bool | None:
        result = test(value)
        return None if result is None else not result

    return negated


def ordering_test(
    compare: Callable[[Any, Any], bool], threshold: int | Decimal
) -> Callable[[Any], bool | None]:
    """Whether a value stands in ``compare`` order with ``threshold``."""
    exact, approximate = threshold, float(threshold)

    def ordered(value: Any) -> bool | None:
        number = as_number(value)
        if number is None:  # NaN compares false with everything: unknown, not "no"
            return None
        return compare(number, approximate if type(number) is float else exact)

    return ordered


def equality_test(expected: Any) -> Callable[[Any], bool | None]:
    """Whether a value equals ``expected`` (numbers as numbers; strings, booleans exactly)."""
    if isinstance(expected, bool):
        return lambda value: value is expected if isinstance(value, bool) else None
    if isinstance(expected, str):
        return lambda value: value == expected if isinstance(value, str) else None
    exact, approximate = expected, float(expected)

    def equal(value: Any) -> bool | None:
        number = as_number(value)
        if number is None:
            return None
        return number == (approximate if type(number) is float else exact)

    return equal


def membership_test(items: list[Any]) -> Callable[[Any], bool | None]:
    """Whether a value is one of ``items`` (numbers as numbers; strings, booleans exactly)."""
    strings = frozenset(item for item in items if isinstance(item, str))
    flags = frozenset(item for item in items if isinstance(item, bool))
    numbers = [item for item in items if not isinstance(item, bool | str)]
    exact = frozenset(numbers)
    approximate = frozenset(float(number) for number in numbers)

    def member(value: Any) -> bool | None:
        if isinstance(value, bool):
            return value in flags
        if isinstance(value, str) and value in strings:
            return True
        number = as_number(value)
        if number is None:
            # A string that is no number is simply not in a list of numbers and other strings.
            return False if isinstance(value, str) else None
        return number in (approximate if type(number) is float else exact)

    return member


def domain_of(text: str) -> str | None:
    """The domain of an address (``Ann <ann@Example.com>``), a URL or a bare domain, lower-case;
    None if there is none."""
    value = text.strip().lower()
    if value.endswith(">") and "<" in value:
        value = value[value.rfind("<") + 1 : -1]
    if "@" in value:
        value = value.rsplit("@", 1)[1]
    elif "://" in value:
        value = urlsplit(value).hostname or ""
    value = value.rstrip(".")
    if not value or any(char.isspace() or char in "/@:<>" for char in value):
        return None
    return value


def allowlist_test(allowlist: Allowlist) -> Callable[[Any], bool | None]:
    """Whether a value (or every value of a list) is inside the allowlist, read by its kind."""
    kind = allowlist.kind
    exact = frozenset(entry for entry in allowlist.entries if not entry.startswith("*."))
    suffixes = tuple(entry[1:] for entry in allowlist.entries if entry.startswith("*."))
    if kind == "tools":
        exact = frozenset(entry.removeprefix("tool:").lower() for entry in allowlist.entries)

    def one(value: Any) -> bool | None:
        if not isinstance(value, str):
            return None
        if kind == "domains":
            domain = domain_of(value)
            if domain is None:
                return None
            return domain in exact or (bool(suffixes) and domain.endswith(suffixes))
        if kind == "recipients":
            address = value.strip().lower()
            if address.endswith(">") and "<" in address:
                address = address[address.rfind("<") + 1 : -1]
            return address in exact if "@" in address else None
        if kind == "tools":
            return value.removeprefix("tool:").lower() in exact
        return value in exact

    def inside(value: Any) -> bool | None:
        # Several recipients: inside only if every one is.
        if isinstance(value, list | tuple):
            results = [one(item) for item in value]
            if False in results:
                return False
            return None if None in results else True
        return one(value)

    return inside
