"""The spend ledger: money reserved before a call, settled with its actual cost after.

A reservation adds its amount to every scope it counts against (run, workflow per day, agent per
day, tenant per month, global per day) with one conditional UPDATE per scope,
``reserved = reserved + amount WHERE spent + reserved + amount <= limit``, all in one
transaction: the check and the write are the same statement, so a hard ceiling is never passed,
however many workers reserve at once. If any scope refuses, nothing is reserved
(``CeilingExceeded`` names the scope). Settling moves the amount out of ``reserved`` and the
actual cost into ``spent``; releasing moves it out of ``reserved`` only. The reaper releases
reservations whose holder died (``reservations_release_expired``).

The same SQL runs on PostgreSQL and SQLite (``UPDATE … RETURNING``). Money is ``Decimal``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache
from operator import attrgetter
from typing import Any

from django.contrib.auth.models import User
from django.db import IntegrityError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from audit.selectors import audit_event_exists
from audit.services import Entry, audit_record_alone, audit_record_many
from audit.verbs import ActorType, Verb
from infra.sql import BY_KEY, Batch, Prepared, attnames, execute_prepared, from_row
from policies.calls import charged_elsewhere
from policies.errors import (
    CeilingExceeded,
    CeilingNotRaised,
    InvalidAmount,
    InvalidReservation,
    InvalidScope,
    ReservationNotFound,
    ReservationReleased,
    ReservationSettled,
)
from policies.limits import MONEY_QUANTUM, CeilingScope
from policies.models import (
    Reservation,
    ReservationKind,
    ReservationStatus,
    ScopeKind,
    SpendScope,
)
from policies.spend_selectors import ceiling_raise_check

__all__ = [
    "Held",
    "HoldRequest",
    "ScopeSpend",
    "Settlement",
    "ceiling_charge_released",
    "ceiling_raise",
    "ceiling_release",
    "ceiling_reserve",
    "ceiling_settle",
    "hold_answer",
    "hold_request",
    "hold_scope_ids",
    "hold_statements",
    "period_start_for",
    "periods_of",
    "reservations_release_expired",
    "reservations_release_for_step",
    "settle_hold_prepared",
    "settlement_apply",
    "settlement_entries",
    "settlement_prepared",
    "settlement_statements",
    "settlements_apply",
    "settlements_prepared",
]

_MAX_MONEY = Decimal("99999999.999999")


@dataclass(frozen=True, slots=True)
class ScopeSpend:
    """One scope's state as the ledger saw it."""

    id: int
    kind: str
    key: str
    period_start: datetime | None
    limit: Decimal
    spent: Decimal
    reserved: Decimal
    soft_ratio: Decimal

    def as_dict(self) -> dict[str, str | None]:
        return {
            "kind": self.kind,
            "key": self.key,
            "period_start": self.period_start.isoformat() if self.period_start else None,
            "limit": str(self.limit),
            "spent": str(self.spent),
            "reserved": str(self.reserved),
        }


def _money(value: object, what: str = "amount") -> Decimal:
    if isinstance(value, float) or not isinstance(value, (Decimal, int)) or isinstance(value, bool):
        raise InvalidAmount(f"{what} must be a Decimal, not {type(value).__name__}")
    amount = Decimal(value)
    if not amount.is_finite() or amount < 0 or amount > _MAX_MONEY:
        raise InvalidAmount(f"{what} {amount} is out of range")
    return amount.quantize(MONEY_QUANTUM)


def _dec(value: object) -> Decimal:
    """A number as the database returned it (SQLite may hand back a float or int)."""
    return (value if isinstance(value, Decimal) else Decimal(str(value))).quantize(MONEY_QUANTUM)


def period_start_for(kind: str, now: datetime) -> datetime | None:
    """The start of ``kind``'s period holding ``now``: None for a run, the UTC day or month."""
    utc = now.astimezone(UTC)
    if kind == ScopeKind.RUN:
        return None
    if kind == ScopeKind.TENANT_MONTH:
        return utc.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if kind in (ScopeKind.WORKFLOW_DAY, ScopeKind.AGENT_DAY, ScopeKind.GLOBAL_DAY):
        return utc.replace(hour=0, minute=0, second=0, microsecond=0)
    raise InvalidScope(f"unknown scope kind {kind!r}")


def periods_of(scopes: Sequence[CeilingScope], now: datetime) -> tuple[datetime | None, ...]:
    """:func:`period_start_for` of each scope, the day and month worked out once (and kept for
    the last day asked about: every call of a day asks the same)."""
    utc = now.astimezone(UTC)
    key = (tuple(map(_SCOPE_KIND, scopes)), utc.year, utc.month, utc.day)
    global _periods_last
    last = _periods_last  # read once: another thread may replace it meanwhile
    if last is not None and last[0] == key:
        return last[1]
    periods = _periods_of(key[0], utc)
    _periods_last = (key, periods)
    return periods


_SCOPE_KIND = attrgetter("scope")
#: :func:`periods_of`'s last answer: ((scope kinds, UTC day), periods).
_periods_last: tuple[Any, tuple[datetime | None, ...]] | None = None


def _periods_of(kinds: tuple[str, ...], utc: datetime) -> tuple[datetime | None, ...]:
    day = utc.replace(hour=0, minute=0, second=0, microsecond=0)
    by_kind: dict[str, datetime | None] = {
        ScopeKind.RUN: None,
        ScopeKind.TENANT_MONTH: day.replace(day=1),
        ScopeKind.WORKFLOW_DAY: day,
        ScopeKind.AGENT_DAY: day,
        ScopeKind.GLOBAL_DAY: day,
    }
    try:
        return tuple(by_kind[kind] for kind in kinds)
    except KeyError as exc:
        raise InvalidScope(f"unknown scope kind {exc.args[0]!r}") from None


def _table() -> str:
    return connection.ops.quote_name(SpendScope._meta.db_table)


def _at(moment: datetime) -> Any:
    """A datetime as this database stores it (SQLite: naive UTC text), for raw SQL."""
    return connection.ops.adapt_datetimefield_value(moment)


def _q(name: str) -> str:
    return connection.ops.quote_name(name)


def _scope_row(scope: CeilingScope, period: datetime | None, now: datetime) -> SpendScope:
    """The scope's row for this period, created with the policy's limit if it is new."""
    defaults = {
        "limit": _money(scope.limit, "limit"),
        "soft_ratio": scope.soft_ratio,
        "updated_at": now,
    }
    try:
        with transaction.atomic():
            row, _ = SpendScope.objects.get_or_create(
                kind=scope.scope, key=scope.key, period_start=period, defaults=defaults
            )
    except IntegrityError:
        row = SpendScope.objects.get(kind=scope.scope, key=scope.key, period_start=period)
    return row


def _spend(row: SpendScope) -> ScopeSpend:
    return ScopeSpend(
        row.pk,
        row.kind,
        row.key,
        row.period_start,
        _dec(row.limit),
        _dec(row.spent),
        _dec(row.reserved),
        Decimal(str(row.soft_ratio)),
    )


def _refused(
    scope: CeilingScope,
    period: datetime | None,
    amount: Decimal,
    run_id: int | None,
    step_id: int | None,
    action: str,
) -> CeilingExceeded:
    row = _scope_row(scope, period, timezone.now())
    state = _spend(row)
    detail = {**state.as_dict(), "amount": str(amount), "action": action}
    audit_record_alone(
        Entry(
            verb=Verb.CEILING_EXCEEDED,
            object_type="spend_scope",
            object_id=row.pk,
            run_id=run_id,
            step_id=step_id,
            data=detail,
        )
    )
    return CeilingExceeded(
        f"{action or 'the call'} needs {amount}: the {state.kind} ceiling"
        f"{_key_label(state.kind, state.key)} is {state.limit}, with {state.spent} spent and"
        f" {state.reserved} reserved",
        scope=state,
        amount=amount,
        detail=detail,
    )


def _key_label(kind: str, key: str) -> str:
    """Whose ceiling, in a refusal's words: " (run 7)", " (refund_desk)", or nothing."""
    if not key:
        return ""
    return f" (run {key})" if kind == ScopeKind.RUN else f" ({key})"


def _warned_already(scope_id: int) -> bool:
    return audit_event_exists(Verb.CEILING_WARNED, "spend_scope", scope_id)


#: (kind, key, period start) -> the scope row's id, learnt once per process. A row is never
#: deleted in use; an id that no longer matches its row (a test emptied the table) is learnt again.
_scope_ids: dict[tuple[str, str, datetime | None], int] = {}
#: Bounds ``_scope_ids``, which learns a row per run: past it, the process starts afresh.
_SCOPE_IDS_MAX = 10_000


def _scope_id(scope: CeilingScope, period: datetime | None, now: datetime) -> int:
    key = (scope.scope, scope.key, period)
    found = _scope_ids.get(key)
    if found is None:
        found = _learn(key, _scope_row(scope, period, now).pk)
    return found


def _learn(key: tuple[str, str, datetime | None], scope_id: int) -> int:
    if len(_scope_ids) >= _SCOPE_IDS_MAX:  # a row per run: forgotten in bulk, learnt again
        _scope_ids.clear()
    _scope_ids[key] = scope_id
    return scope_id


def _in_id_order(ids: Sequence[int]) -> str:
    """``WHERE id IN (…)`` that first locks the rows in ascending id order (on a database with row
    locks). Every transaction that touches several scope rows locks them this way, all in one
    statement, so no two of them can wait on each other."""
    lock = f" ORDER BY {_q('id')} FOR UPDATE" if connection.features.has_select_for_update else ""
    marks = ", ".join(["%s"] * len(ids))
    return f"{_q('id')} IN (SELECT {_q('id')} FROM {_table()} WHERE {_q('id')} IN ({marks}){lock})"


def _insert_held(cursor: Any, request: HoldRequest, ids: list[int], amount: Decimal) -> Reservation:
    """INSERT ``request``'s held reservation of ``amount`` (one statement, no ORM on the agent
    step's path)."""
    values = {
        "run_id": request.run_id,
        "step_id": request.step_id,
        "action": request.action,
        "amount": amount,
        "actual": None,
        "scope_ids": json.dumps(ids),
        "status": ReservationStatus.HELD.value,
        "owner": request.owner,
        "expires_at": _at(request.expires_at),
        "created_at": _at(request.now),
        "settled_at": None,
        "kind": request.kind,
        "block_id": None,
    }
    fields = Reservation._meta.concrete_fields
    columns = ", ".join(_q(f.column) for f in fields)
    named = [f.column for f in fields if f.column != "id"]
    cursor.execute(
        f"INSERT INTO {_q(Reservation._meta.db_table)} ({', '.join(_q(c) for c in named)}) "
        f"VALUES ({', '.join(['%s'] * len(named))}) RETURNING {columns}",
        [values[c] for c in named],
    )
    return from_row(Reservation, cursor.fetchone())


# --- a reservation as statements of a batch (PostgreSQL) ----------------------------------------


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """A reservation to make with SQL statements of a caller's batch (:func:`hold_statements`),
    its answer read from the batch's rows later (:func:`hold_answer`). The engine asks for one in
    the transaction that claims a step, so the step's reservation costs no round trip of its own;
    :func:`ceiling_reserve` runs one on its own."""

    scopes: tuple[CeilingScope, ...]
    periods: tuple[datetime | None, ...]
    amount: Decimal
    run_id: int | None
    step_id: int | None
    action: str
    owner: str
    expires_at: datetime
    now: datetime
    #: An SQL condition the reservation is made under (the engine's: the step is still running
    #: under this owner when the statement runs), its parameters' places as ``{0}``, ``{1}``…,
    #: their values and PostgreSQL types; "": unconditionally.
    guard: str = ""
    guard_params: tuple[Any, ...] = ()
    guard_types: tuple[str, ...] = ()
    #: ``call`` (one call's worst case) or ``block`` (several calls', ``policies.blocks``).
    kind: str = ReservationKind.CALL.value
    #: A block's amount when it leaves every scope under its soft threshold; otherwise the
    #: block is ``amount`` alone (one call's worth), refused only if that does not fit either.
    most: Decimal | None = None


def hold_request(
    *,
    scopes: Sequence[CeilingScope],
    amount: Decimal,
    run_id: int | None,
    step_id: int | None,
    action: str,
    owner: str,
    ttl: timedelta,
    now: datetime | None = None,
    guard: str = "",
    guard_params: Sequence[Any] = (),
    guard_types: Sequence[str] = (),
    kind: str = ReservationKind.CALL.value,
    most: Decimal | None = None,
) -> HoldRequest:
    """A checked :class:`HoldRequest` (the same rules as :func:`ceiling_reserve`)."""
    if kind not in ReservationKind.values:
        raise InvalidReservation(f"unknown reservation kind {kind!r}")
    if most is not None:
        if kind != ReservationKind.BLOCK:
            raise InvalidReservation("only a block may ask for more than its amount")
        most = _money(most, "most")
        if most < _money(amount):
            raise InvalidReservation("a block's most is at least its amount")
    amount = _money(amount)
    now = now or timezone.now()
    if timezone.is_naive(now):
        raise InvalidReservation("now must carry a time zone")
    if ttl <= timedelta(0):
        raise InvalidReservation("a reservation must expire after now")
    if len(action) > 200 or len(owner) > 200:
        raise InvalidReservation("action and owner are at most 200 characters")
    kinds = [s.scope for s in scopes]
    if len(set(kinds)) != len(kinds):
        raise InvalidScope("a scope kind may appear once per reservation")
    if not scopes:
        raise InvalidScope("a reservation counts against at least one scope")
    periods = periods_of(scopes, now)
    return HoldRequest(
        tuple(scopes),
        periods,
        amount,
        run_id,
        step_id,
        action,
        owner,
        now + ttl,
        now,
        guard,
        tuple(guard_params),
        tuple(guard_types),
        kind,
        most,
    )


def hold_statements(request: HoldRequest) -> list[tuple[str | Prepared, list[Any]]]:
    """The statements that make ``request``'s reservation, for a PostgreSQL batch: the scope
    rows this process does not know yet, created if missing (``ON CONFLICT DO NOTHING``), then
    ONE statement that locks every scope row in id order, checks that the amount fits under
    every limit, and only then adds it to every row and inserts the held reservation. It never
    fails the batch: a refusal writes nothing, and the statement's one row says what happened
    (:func:`hold_answer`). When the process knows every scope row (the common case), that one
    statement is prepared: no parsing or planning per call."""
    statements: list[tuple[str | Prepared, list[Any]]] = []
    ids = hold_scope_ids(request)
    tail = [
        len(request.scopes),
        str(request.amount),
        request.now,
        request.run_id,
        request.step_id,
        request.action,
        request.owner,
        request.expires_at,
        *request.guard_params,
    ]
    most = [str(request.most)] if request.most is not None else []
    block = request.most is not None
    if ids is not None:
        return [
            (
                _hold_prepared(request.guard, request.guard_types, request.kind, block),
                [_array(ids), *tail, *most],
            )
        ]
    run_scope = _only_new_run_scope(request)
    if run_scope is not None:
        # A run's first reservation in this process (the common case of a new row): its run's
        # scope row made if missing and found by its key, both prepared.
        scope, known_ids = run_scope
        return [
            (
                _run_scope_insert(),
                [scope.key, str(_money(scope.limit, "limit")), str(scope.soft_ratio), request.now],
            ),
            (
                _hold_run_prepared(request.guard, request.guard_types, request.kind, block),
                [_array(known_ids), *tail, scope.key, *most],
            ),
        ]
    # Some rows are new to this process: looked up by kind, key and period (named parameters,
    # since the statement uses some of them more than once).
    match: list[str] = []
    named: dict[str, Any] = {}
    new_rows: list[str] = []
    new_params: list[Any] = []
    for n, (scope, period) in enumerate(zip(request.scopes, request.periods, strict=True)):
        known = _scope_ids.get((scope.scope, scope.key, period))
        if known is not None:
            match.append(f"{_q('id')} = %(id{n})s")
            named[f"id{n}"] = known
            continue
        when = (
            f"{_q('period_start')} IS NULL"
            if period is None
            else f"{_q('period_start')} = %(p{n})s"
        )
        match.append(f"({_q('kind')} = %(k{n})s AND {_q('key')} = %(key{n})s AND {when})")
        named.update({f"k{n}": scope.scope, f"key{n}": scope.key, f"p{n}": period})
        new_rows.append("(%s, %s, %s, %s, %s, 0, 0, %s)")
        new_params.extend(
            [
                scope.scope,
                scope.key,
                period,
                _money(scope.limit, "limit"),
                scope.soft_ratio,
                request.now,
            ]
        )
    statements.append(
        (
            f"INSERT INTO {_table()} ({_q('kind')}, {_q('key')}, {_q('period_start')}, "
            f"{_q('limit')}, {_q('soft_ratio')}, {_q('reserved')}, {_q('spent')}, "
            f"{_q('updated_at')}) VALUES {', '.join(new_rows)} ON CONFLICT DO NOTHING",
            new_params,
        )
    )
    marks = [f"%(t{n})s" for n in range(len(tail))]
    named.update({f"t{n}": value for n, value in enumerate(tail)})
    named["most"] = str(request.most)
    sql = _hold_sql(
        f"({' OR '.join(match)})",
        request.guard,
        marks,
        states=True,
        kind=request.kind,
        most="%(most)s" if block else None,
    )
    statements.append((sql, named))  # type: ignore[arg-type]  # psycopg takes named parameters as a dict
    return statements


def _hold_sql(
    where: str,
    guard: str,
    marks: Sequence[str],
    *,
    states: bool = False,
    kind: str = ReservationKind.CALL.value,
    most: str | None = None,
    ids: str = "",
) -> str:
    """The hold's one statement: scope rows matching ``where`` locked in id order, then the
    check, the update and the insert. ``marks``: the placeholders of (count, amount, now, run,
    step, action, owner, expiry, then the guard's own); ``most``: a block's, whose amount is
    ``most`` where every row has room for it, else ``amount``; ``ids``: an expression of the
    rows' ids (an array) that ``where`` reads as ``(SELECT a FROM ids)``, worked out once."""
    table, reservations = _table(), _q(Reservation._meta.db_table)
    n, amount, now, run, step, action, owner, expires = marks[:8]
    running = f" AND {guard.format(*marks[8:])}" if guard else ""
    held = ReservationStatus.HELD.value
    first = f"ids AS MATERIALIZED (SELECT {ids} AS a), " if ids else ""
    return f"""WITH {first}locked AS (
        SELECT id, kind, key, spent, reserved, "limit", soft_ratio FROM {table}
        WHERE {where}{running} ORDER BY id FOR UPDATE
    ), ok AS (
        SELECT count(*) = {n} AND coalesce(bool_and(spent + reserved + {amount} <= "limit"), false)
               AS fits, {_take(amount, most)} AS take, jsonb_agg(id ORDER BY id) AS ids
        FROM locked
    ), moved AS (
        UPDATE {table} s SET reserved = s.reserved + ok.take, updated_at = {now}
        FROM ok WHERE ok.fits AND s.id IN (SELECT id FROM locked)
        RETURNING s.id
    ), held AS (
        INSERT INTO {reservations} (run_id, step_id, action, amount, actual, scope_ids,
            status, owner, expires_at, created_at, settled_at, kind)
        SELECT {run}, {step}, {action}, ok.take, NULL, ok.ids, '{held}', {owner}, {expires},
               {now}, NULL, '{ReservationKind(kind).value}'
        FROM ok WHERE ok.fits
        RETURNING id, scope_ids, amount
    )
    {_answer("(SELECT take FROM ok)", states)}"""


def _take(amount: str, most: str | None) -> str:
    """What a hold adds: ``amount``, or a block's ``most`` where it leaves every locked row
    under its soft threshold (a block never makes a scope look nearer its ceiling than its
    calls do)."""
    if most is None:
        return f"{amount}::numeric"
    return (
        f'CASE WHEN coalesce(bool_and(spent + reserved + {most} <= "limit" * soft_ratio), '
        f"false) THEN {most}::numeric ELSE {amount}::numeric END"
    )


def _answer(amount: str, states: bool) -> str:
    """The last SELECT of a hold: the reservation made (id, scope ids), how many rows moved, and
    every locked row's state (before this amount) when ``states`` (the caller learns the rows'
    ids from it), when the amount did not fit, or when it takes a row to its soft threshold.
    Otherwise NULL: the common answer carries nothing to parse."""
    rows = """(SELECT jsonb_agg(jsonb_build_array(id, kind, key, spent::text, reserved::text,
                "limit"::text, soft_ratio::text) ORDER BY id) FROM locked)"""
    if not states:
        rows = f"""CASE WHEN NOT (SELECT fits FROM ok) OR EXISTS (SELECT 1 FROM locked
                WHERE spent + reserved + {amount} >= "limit" * soft_ratio) THEN {rows} END"""
    return f"""SELECT (SELECT id FROM held), (SELECT scope_ids FROM held),
           (SELECT count(*) FROM moved), {rows}, (SELECT amount::text FROM held)"""


_HOLD_TYPES = ("bigint[]", "integer", "numeric", "timestamptz", "bigint", "bigint", "text", "text")


@cache
def _hold_prepared(guard: str, guard_types: tuple[str, ...], kind: str, block: bool) -> Prepared:
    types = [*_HOLD_TYPES, "timestamptz", *guard_types]
    marks = [f"${i}" for i in range(2, len(types) + 1)]
    most = None
    if block:  # a block's most: the last parameter
        types.append("numeric")
        most = f"${len(types)}"
    return Prepared(_hold_sql(_ids_in("$1"), guard, marks, kind=kind, most=most), types)


@cache
def _hold_run_prepared(
    guard: str, guard_types: tuple[str, ...], kind: str, block: bool
) -> Prepared:
    """:func:`_hold_prepared` for rows known by id plus the run's scope row, found by its key
    (its last parameter) through its unique index. Its answer carries the rows' states only
    when :func:`_answer` needs them: the run's row is not worth learning (a run's later calls
    here take from the block this makes), and the others are known already."""
    types = [*_HOLD_TYPES, "timestamptz", *guard_types, "text"]
    marks = [f"${i}" for i in range(2, len(types))]
    run = (
        f"SELECT {_q('id')} FROM {_table()} WHERE {_q('kind')} = '{ScopeKind.RUN.value}' "
        f"AND {_q('key')} = ${len(types)} AND {_q('period_start')} IS NULL"
    )
    ids = f"((SELECT array_agg(i ORDER BY i) FROM (SELECT unnest($1) UNION ALL {run}) AS u(i)))"
    most = None
    if block:  # a block's most: the last parameter, after the run's key
        types.append("numeric")
        most = f"${len(types)}"
    return Prepared(
        _hold_sql(_ids_in("(SELECT a FROM ids)"), guard, marks, kind=kind, most=most, ids=ids),
        types,
    )


@cache
def _run_scope_insert() -> Prepared:
    """A run's scope row, unless it exists: key, limit, soft ratio, now."""
    return Prepared(
        f"INSERT INTO {_table()} ({_q('kind')}, {_q('key')}, {_q('period_start')}, "
        f"{_q('limit')}, {_q('soft_ratio')}, {_q('reserved')}, {_q('spent')}, "
        f"{_q('updated_at')}) VALUES ('{ScopeKind.RUN.value}', $1, NULL, $2, $3, 0, 0, $4) "
        "ON CONFLICT DO NOTHING",
        ["text", "numeric", "numeric", "timestamptz"],
    )


def _array(ids: Sequence[int] | frozenset[int] | set[int]) -> str:
    return "{" + ",".join(str(i) for i in sorted(ids)) + "}"


def _only_new_run_scope(request: HoldRequest) -> tuple[CeilingScope, list[int]] | None:
    """The request's run scope and the ids of its other scopes, when the run's is the only row
    this process does not know (None otherwise)."""
    new: CeilingScope | None = None
    known = []
    for scope, period in zip(request.scopes, request.periods, strict=True):
        found = _scope_ids.get((scope.scope, scope.key, period))
        if found is not None:
            known.append(found)
        elif scope.scope == ScopeKind.RUN and new is None:
            new = scope
        else:
            return None
    return (new, known) if new is not None else None


def _ids_in(ids: str, alias: str = "") -> str:
    """``id = ANY(ids)`` for a prepared statement, ``ids`` an array in ascending order. The range
    says the rows are few to the planner whatever the table's statistics: a generic plan made
    while the table of scopes was new (a page, no statistics) scanned it whole for every
    reservation and settlement, for the worker's life, as it grew by a row per run."""
    return (
        f"{alias}id = ANY({ids}::bigint[]) AND {alias}id BETWEEN ({ids})[1] "
        f"AND ({ids})[cardinality({ids})]"
    )


def hold_scope_ids(request: HoldRequest) -> frozenset[int] | None:
    """The scope rows ``request`` would lock, if this process knows them all (else None)."""
    ids = []
    for scope, period in zip(request.scopes, request.periods, strict=True):
        known = _scope_ids.get((scope.scope, scope.key, period))
        if known is None:
            return None
        ids.append(known)
    return frozenset(ids)


@dataclass(frozen=True, slots=True)
class Held:
    """The answer to a :class:`HoldRequest`: the reservation made, or why none was."""

    request: HoldRequest
    #: The held reservation (built from the answer, not read back); None: none was made.
    reservation: Reservation | None
    #: Every scope row as the statement locked it, before this hold's amount.
    states: tuple[ScopeSpend, ...]
    #: Whether the locked rows are exactly the request's scopes.
    matched: bool = False
    #: A call's share of a budget block the worker holds (``policies.blocks``): the block
    #: answers for it, and this is the call's worst case taken from it (the request is the
    #: block's own).
    share: Decimal | None = None

    @property
    def covers(self) -> Decimal:
        """What this answer set aside for the call that asked: its share of a block, or the
        request's amount."""
        return self.request.amount if self.share is None else self.share

    @property
    def missing(self) -> bool:
        """Not every scope row was found (a row this process knew is gone, or the step was not
        this worker's): nothing was reserved, and asking again on its own will tell."""
        return self.reservation is None and not self.matched

    def refused(self) -> int | None:
        """The position (in the request's scopes) of the first scope the amount does not fit."""
        if self.reservation is not None or self.missing:
            return None
        by_kind = {state.kind: state for state in self.states}
        for position, scope in enumerate(self.request.scopes):
            state = by_kind.get(scope.scope)
            if state is None or state.spent + state.reserved + self.request.amount > state.limit:
                return position
        return None

    def warnings(self) -> list[Entry]:
        """``CEILING_WARNED`` for every scope this hold took past its soft threshold (once per
        scope and period: reads the audit trail only when a threshold was crossed)."""
        if self.reservation is None or not self.states or self.share is not None:
            return []
        by_kind = {state.kind: state for state in self.states}
        request = self.request
        added = _dec(self.reservation.amount)  # a block's may be more than the request's amount
        found = []
        for scope in request.scopes:
            state = by_kind[scope.scope]
            row = (
                state.id,
                state.spent,
                state.reserved + added,
                state.limit,
                state.soft_ratio,
            )
            warning = _warning(scope, row, added, request.run_id, request.step_id)
            if warning is not None:
                found.append(warning)
        return found


def _learn_the_new_one(request: HoldRequest, ids: Sequence[int]) -> None:
    """A hold made without returning its rows' states (every row fitted): learn the one scope
    row this process did not know (the run's, found by its key) from the ids it locked."""
    unknown = None
    known = set()
    for scope, period in zip(request.scopes, request.periods, strict=True):
        key = (scope.scope, scope.key, period)
        found = _scope_ids.get(key)
        if found is not None:
            known.add(found)
        elif unknown is None:
            unknown = key
        else:
            return  # more than one: which id is whose is not known
    new = [i for i in ids if i not in known]
    if unknown is not None and len(new) == 1:
        _learn(unknown, int(new[0]))


def hold_answer(request: HoldRequest, row: Sequence[Any] | None) -> Held:
    """Read the answer of :func:`hold_statements`' last statement (its one row)."""
    if row is None:
        return Held(request, None, ())
    reservation_id, scope_ids, _moved, locked, taken = (*row, None)[:5]
    states = tuple(
        ScopeSpend(
            int(item[0]),
            item[1],
            item[2],
            None,
            _dec(item[5]),
            _dec(item[3]),
            _dec(item[4]),
            Decimal(item[6]),
        )
        for item in (json.loads(locked) if isinstance(locked, str) else locked or [])
    )
    by_kind = {state.kind: state for state in states}
    # No states: the statement found every row by id and the amount fitted, crossing no soft
    # threshold (``_answer``).
    matched = (locked is None and reservation_id is not None) or (
        len(states) == len(request.scopes)
        and all(
            by_kind.get(scope.scope) is not None and by_kind[scope.scope].key == scope.key
            for scope in request.scopes
        )
    )
    if matched and states:  # learnt for the next hold: addressed by id, no lookup by name
        for scope, period in zip(request.scopes, request.periods, strict=True):
            _learn((scope.scope, scope.key, period), by_kind[scope.scope].id)
    if reservation_id is None:
        return Held(request, None, states, matched)
    ids = json.loads(scope_ids) if isinstance(scope_ids, str) else list(scope_ids)
    if not states:
        _learn_the_new_one(request, ids)
    values = {
        "id": reservation_id,
        "run_id": request.run_id,
        "step_id": request.step_id,
        "action": request.action,
        "amount": _dec(taken) if taken is not None else request.amount,
        "actual": None,
        "scope_ids": ids,
        "status": ReservationStatus.HELD,
        "owner": request.owner,
        "expires_at": request.expires_at,
        "created_at": request.now,
        "settled_at": None,
        "kind": request.kind,
        "block_id": None,
    }
    # As read from a row (positional, in the fields' order): half the cost of keyword arguments.
    names = attnames(Reservation)
    reservation = Reservation.from_db(connection.alias, names, [values[n] for n in names])
    return Held(request, reservation, states, matched)


def ceiling_reserve(
    *,
    scopes: Sequence[CeilingScope],
    amount: Decimal,
    run_id: int | None,
    step_id: int | None,
    action: str,
    owner: str,
    ttl: timedelta,
    now: datetime | None = None,
    kind: str = ReservationKind.CALL.value,
    most: Decimal | None = None,
) -> Reservation:
    """Set ``amount`` aside in every scope, or in none (``CeilingExceeded``, naming the scope
    that refused). ``kind``: a call's reservation, or a block of several (``policies.blocks``),
    which is ``most`` where that leaves every scope under its soft threshold. In one transaction: the reservation's INSERT, then ONE conditional UPDATE of
    every scope row (``spent + reserved + amount <= limit``, rows locked in id order), so the
    shared rows (workflow, tenant, global) stay locked for one statement and the commit only. A
    scope row is created the first time its period is seen. Crossing a scope's soft threshold
    records ``CEILING_WARNED`` once per scope and period. On PostgreSQL all of it is one
    round trip (:func:`hold_statements`)."""
    request = hold_request(
        scopes=scopes,
        amount=amount,
        run_id=run_id,
        step_id=step_id,
        action=action,
        owner=owner,
        ttl=ttl,
        now=now,
        kind=kind,
        most=most,
    )
    if connection.vendor == "postgresql":
        return _reserve_held(request)
    now, periods = request.now, list(request.periods)
    # A block asks for its most first and, where that does not fit, for its amount.
    amounts = [request.amount] if request.most is None else [request.most, request.amount]
    attempts = 0
    while attempts < 2:
        amount = amounts[0]
        # A block's most only while it leaves every scope under its soft threshold.
        room = f"{_q('limit')} * {_q('soft_ratio')}" if amount is request.most else _q("limit")
        ids = [_scope_id(scope, period, now) for scope, period in zip(scopes, periods, strict=True)]
        with transaction.atomic():
            with connection.cursor() as cursor:
                reservation = _insert_held(cursor, request, ids, amount)
                cursor.execute(
                    f"UPDATE {_table()} SET {_q('reserved')} = {_q('reserved')} + %s, "
                    f"{_q('updated_at')} = %s WHERE {_in_id_order(ids)} "
                    f"AND {_q('spent')} + {_q('reserved')} + %s <= {room} "
                    f"RETURNING {_q('id')}, {_q('spent')}, {_q('reserved')}, {_q('limit')}, "
                    f"{_q('soft_ratio')}, {_q('kind')}, {_q('key')}",
                    [amount, _at(now), *ids, amount],
                )
                rows = {row[0]: row for row in cursor.fetchall()}
            known = all(
                rows[scope_id][5:] == (scope.scope, scope.key)
                for scope, scope_id in zip(scopes, ids, strict=True)
                if scope_id in rows
            )
            if len(rows) == len(ids) and known:
                warnings = [
                    warning
                    for scope, scope_id in zip(scopes, ids, strict=True)
                    if (warning := _warning(scope, rows[scope_id], amount, run_id, step_id))
                ]
                audit_record_many(warnings, now=now)
                return reservation
            transaction.set_rollback(True)
        missing = not known or SpendScope.objects.filter(pk__in=ids).count() != len(ids)
        if not missing and len(amounts) > 1:
            amounts.pop(0)  # a block's most did not fit: one call's worth may
            continue
        if not missing:
            failed = next(i for i, scope_id in enumerate(ids) if scope_id not in rows)
            raise _refused(scopes[failed], periods[failed], amount, run_id, step_id, action)
        _scope_ids.clear()  # rows this process knew are gone: look them up again
        attempts += 1
    raise AssertionError("unreachable: the scope rows were created on the second attempt")


def _reserve_held(request: HoldRequest) -> Reservation:
    """:func:`ceiling_reserve` on PostgreSQL: the hold's statements as one batch of their own."""
    for _attempt in range(2):
        batch = Batch()
        for sql, params in hold_statements(request):
            if isinstance(sql, Prepared):
                batch.add_prepared(sql, params)
            else:
                batch.add(sql, params)
        rows = batch.run_in_transaction() if connection.in_atomic_block else batch.run()
        held = hold_answer(request, rows[0] if rows else None)
        if held.reservation is not None:
            warnings = held.warnings()
            if warnings:  # rare: once per scope and period
                with transaction.atomic():
                    audit_record_many(warnings, now=request.now)
            return held.reservation
        failed = held.refused()
        if failed is not None:
            raise _refused(
                request.scopes[failed],
                request.periods[failed],
                request.amount,
                request.run_id,
                request.step_id,
                request.action,
            )
        _scope_ids.clear()  # rows this process knew are gone: look them up again
    raise AssertionError("unreachable: the scope rows were created on the second attempt")


def _warning(
    scope: CeilingScope,
    row: tuple[Any, ...],
    amount: Decimal,
    run_id: int | None,
    step_id: int | None,
) -> Entry | None:
    """``CEILING_WARNED`` if this reservation took the scope past its soft threshold (once per
    scope and period)."""
    scope_id, spent, reserved, limit, soft = row[:5]
    after = _dec(spent) + _dec(reserved)
    threshold = _dec(limit) * Decimal(str(soft))
    if not (after - amount < threshold <= after) or _warned_already(scope_id):
        return None
    return Entry(
        verb=Verb.CEILING_WARNED,
        object_type="spend_scope",
        object_id=scope_id,
        run_id=run_id,
        step_id=step_id,
        data={
            "kind": scope.scope,
            "key": scope.key,
            "limit": str(_dec(limit)),
            "committed": str(after),
            "soft_ratio": str(soft),
        },
    )


def _move(
    scope_ids: Sequence[int], reserved_delta: Decimal, spent_delta: Decimal, now: datetime
) -> None:
    """Apply the same deltas to every scope row, in one statement (rows locked in id order)."""
    if not scope_ids:
        return
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {_table()} SET {_q('reserved')} = {_q('reserved')} - %s, "
            f"{_q('spent')} = {_q('spent')} + %s, {_q('updated_at')} = %s "
            f"WHERE {_in_id_order(scope_ids)}",
            [reserved_delta, spent_delta, _at(now), *scope_ids],
        )


def _locked(reservation_id: int) -> Reservation:
    found = Reservation.objects.select_for_update().filter(pk=reservation_id).first()
    if found is None:
        raise ReservationNotFound(f"no reservation {reservation_id}")
    return found


def _settle_held(reservation_id: int, actual: Decimal, now: datetime) -> Reservation | None:
    """Mark a held reservation settled in one statement; the reservation as it is now, or None
    if it was not held (settled, released or unknown)."""
    fields = Reservation._meta.concrete_fields
    columns = ", ".join(_q(f.column) for f in fields)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {_q(Reservation._meta.db_table)} SET {_q('status')} = %s, {_q('actual')} = %s, "
            f"{_q('settled_at')} = %s WHERE {_q('id')} = %s AND {_q('status')} = %s "
            f"RETURNING {columns}",
            [
                ReservationStatus.SETTLED.value,
                actual,
                _at(now),
                reservation_id,
                ReservationStatus.HELD.value,
            ],
        )
        row = cursor.fetchone()
    return None if row is None else from_row(Reservation, row)


def ceiling_settle(
    reservation_id: int, actual: Decimal, *, now: datetime | None = None
) -> Reservation:
    """Charge the call's actual cost: the reserved amount leaves ``reserved`` and the actual
    cost enters ``spent``, in every scope. The actual is recorded as reported; what is charged is
    at most the amount reserved (the call's max tokens were clamped to it), and an overrun is
    recorded. Settling twice with the same actual is a no-op; with another, ``ReservationSettled``."""
    actual = _money(actual, "actual")
    now = now or timezone.now()
    with transaction.atomic():
        settled = _settle_held(reservation_id, actual, now)
        if settled is None:  # not held: settled already, released, or unknown
            reservation = _locked(reservation_id)
            if reservation.status == ReservationStatus.SETTLED:
                if _dec(reservation.actual) == actual:
                    return reservation
                raise ReservationSettled(
                    f"reservation {reservation_id} was settled with {reservation.actual}"
                )
            raise ReservationReleased(f"reservation {reservation_id} was released")
        reservation = settled
        amount = _dec(reservation.amount)
        charged = min(actual, amount)
        _move(reservation.scope_ids, amount, charged, now)  # the shared rows last: locked briefly
        # An overrun (the call cost more than was set aside) is recorded.
        audit_record_many(settlement_entries(Settlement.of(reservation, actual)), now=now)
    return reservation


def _release(reservation: Reservation, now: datetime) -> None:
    charged = _block_charges([reservation]).get(reservation.pk)
    _move(reservation.scope_ids, _dec(reservation.amount), charged or Decimal(0), now)
    reservation.status = ReservationStatus.RELEASED
    reservation.actual = charged
    reservation.settled_at = now
    reservation.save(update_fields=["status", "actual", "settled_at"])


def _block_charges(reservations: Sequence[Reservation]) -> dict[int, Decimal]:
    """What the calls recorded so far against each block among ``reservations`` cost (at most
    each call's worst case): released, a block still charges them, since they were made."""
    held = {r.pk: r.run_id for r in reservations if r.kind == ReservationKind.BLOCK}
    if not held:
        return {}
    blocks = list(held)
    charges = dict.fromkeys(blocks, Decimal(0))
    for elsewhere, amount in charged_elsewhere(held).items():  # on the steps they paid for
        if elsewhere in charges:
            charges[elsewhere] += amount
    calls = Reservation.objects.filter(
        block_id__in=blocks, status=ReservationStatus.SETTLED
    ).values_list("block_id", "amount", "actual")
    for block_id, amount, actual in calls:
        if block_id is not None:  # always: the filter names blocks
            charges[block_id] += min(_dec(actual), _dec(amount))
    return charges


def ceiling_release(reservation_id: int, *, now: datetime | None = None) -> Reservation:
    """Give the reserved money back (the call failed or was not made). Releasing twice is a
    no-op; releasing a settled reservation is ``ReservationSettled``."""
    now = now or timezone.now()
    with transaction.atomic():
        reservation = _locked(reservation_id)
        if reservation.status == ReservationStatus.RELEASED:
            return reservation
        if reservation.status == ReservationStatus.SETTLED:
            raise ReservationSettled(f"reservation {reservation_id} was settled")
        _release(reservation, now)
    return reservation


def _released_entry(reservation: Reservation, reason: str) -> Entry:
    return Entry(
        verb=Verb.RESERVATION_RELEASED,
        object_type="reservation",
        object_id=reservation.pk,
        run_id=reservation.run_id,
        step_id=reservation.step_id,
        data={
            "amount": str(_dec(reservation.amount)),
            "owner": reservation.owner,
            "reason": reason,
        },
    )


def _release_all(reservations: list[Reservation], reason: str, now: datetime) -> int:
    """Release held reservations in the caller's transaction (rows locked by the caller): the
    amounts are summed per scope and each scope row is updated once, in id order."""
    if not reservations:
        return 0
    charges = _block_charges(reservations)  # a block's calls made so far were spent
    owed: dict[int, tuple[Decimal, Decimal]] = {}
    for reservation in reservations:
        charged = charges.get(reservation.pk, Decimal(0))
        for scope_id in reservation.scope_ids:
            freed, spent = owed.get(scope_id, (Decimal(0), Decimal(0)))
            owed[scope_id] = (freed + _dec(reservation.amount), spent + charged)
    for scope_id in sorted(owed):  # ascending ids, as every multi-row statement locks them
        _move([scope_id], *owed[scope_id], now)
    for reservation in reservations:
        reservation.status = ReservationStatus.RELEASED
        reservation.actual = charges.get(reservation.pk)
        reservation.settled_at = now
    Reservation.objects.bulk_update(reservations, ["status", "actual", "settled_at"])
    audit_record_many([_released_entry(r, reason) for r in reservations], now=now)
    return len(reservations)


def reservations_release_expired(now: datetime | None = None, *, limit: int = 500) -> int:
    """Release held reservations past their expiry (their worker died): the reaper's duty. The
    amounts are summed per scope and each scope row is updated once, in id order."""
    now = now or timezone.now()
    with transaction.atomic():
        expired = list(
            Reservation.objects.select_for_update(skip_locked=True)
            .filter(status=ReservationStatus.HELD, expires_at__lt=now)
            .order_by("expires_at")[:limit]
        )
        return _release_all(expired, "expired", now)


def reservations_release_for_step(
    step_id: int,
    *,
    now: datetime | None = None,
    run_id: int | None = None,
    owner: str = "",
) -> int:
    """Release what a step's lost attempt still holds: the reaper took the step's lease back
    from a dead worker, and its next attempt reserves afresh (holding both until the first
    expired could refuse the retry a ceiling that fits one call). Runs in the caller's
    transaction, before the step can be claimed again, so every held row is the lost one's.
    With the run and the lease's ``owner``: the budget blocks that worker held for the run go
    too (made for an earlier step, spent by this one), charging the calls recorded against
    them."""
    now = now or timezone.now()
    lost = Q(step_id=step_id)
    if run_id is not None and owner:
        lost |= Q(run_id=run_id, owner=owner[:200], kind=ReservationKind.BLOCK)
    with transaction.atomic():
        held = list(
            Reservation.objects.select_for_update()
            .filter(lost, status=ReservationStatus.HELD)
            .order_by("pk")
        )
        return _release_all(held, "lease_expired", now)


def ceiling_charge_released(
    reservation_id: int, actual: Decimal, *, now: datetime | None = None
) -> Reservation:
    """Charge a call that finished after the reaper released its reservation (its worker was
    taken for dead, but the call went through): the money was spent, so ``actual`` enters
    ``spent`` in every scope even past a ceiling, and is recorded as an overrun. Charging twice
    with the same actual is a no-op. A block's release charged the calls recorded until then
    (its ``actual`` then): only the rest is charged now."""
    actual = _money(actual, "actual")
    now = now or timezone.now()
    with transaction.atomic():
        reservation = _locked(reservation_id)
        if reservation.status == ReservationStatus.SETTLED and _dec(reservation.actual) == actual:
            return reservation
        if reservation.status != ReservationStatus.RELEASED:
            raise InvalidReservation(
                f"reservation {reservation_id} is {reservation.status}, not released"
            )
        before = _dec(reservation.actual) if reservation.actual is not None else Decimal(0)
        charged = max(actual - before, Decimal(0))
        _move(reservation.scope_ids, Decimal(0), charged, now)
        reservation.status = ReservationStatus.SETTLED
        reservation.actual = actual
        reservation.settled_at = now
        reservation.save(update_fields=["status", "actual", "settled_at"])
        audit_record_many(
            [
                Entry(
                    verb=Verb.CEILING_EXCEEDED,
                    object_type="reservation",
                    object_id=reservation.pk,
                    run_id=reservation.run_id,
                    step_id=reservation.step_id,
                    data={
                        "amount": str(_dec(reservation.amount)),
                        "actual": str(actual),
                        "charged": str(charged),
                        "overrun": True,
                        "after_release": True,
                    },
                )
            ],
            now=now,
        )
    return reservation


def ceiling_raise(
    *,
    new_limit: Decimal,
    user: User,
    reason: str,
    scope_id: int | None = None,
    run_id: int | None = None,
    now: datetime | None = None,
) -> SpendScope:
    """Raise a scope's hard ceiling (``scope_id``, or the run scope of ``run_id``) to
    ``new_limit``. Only someone with tier 2 or higher may; a reason is required; the limit only
    ever goes up (``CeilingNotRaised``)."""
    new_limit = _money(new_limit, "limit")
    now = now or timezone.now()
    ceiling_raise_check(user, scope_id=scope_id, run_id=run_id, new_limit=new_limit)
    if not reason.strip():
        raise InvalidAmount("a reason is required to raise a ceiling")
    if (scope_id is None) == (run_id is None):
        raise InvalidScope("name either a scope or a run")
    with transaction.atomic():
        query = SpendScope.objects.select_for_update()
        scope = (
            query.filter(pk=scope_id).first()
            if scope_id is not None
            else query.filter(
                kind=ScopeKind.RUN, key=str(run_id), period_start__isnull=True
            ).first()
        )
        if scope is None:
            raise InvalidScope("no such spend scope")
        old = _dec(scope.limit)
        if new_limit <= old:
            raise CeilingNotRaised(f"the ceiling is {old}; {new_limit} does not raise it")
        scope.limit = new_limit
        scope.updated_at = now
        scope.save(update_fields=["limit", "updated_at"])
        audit_record_many(
            [
                Entry(
                    verb=Verb.CEILING_RAISED,
                    object_type="spend_scope",
                    object_id=scope.pk,
                    actor_type=ActorType.HUMAN,
                    actor_id=user.get_username(),
                    run_id=int(scope.key) if scope.kind == ScopeKind.RUN else None,
                    data={
                        "kind": scope.kind,
                        "key": scope.key,
                        "from": str(old),
                        "to": str(new_limit),
                        "reason": reason,
                    },
                )
            ],
            now=now,
        )
    return scope


# --- a settlement written with the step's completion -------------------------------------------


@dataclass(frozen=True, slots=True)
class Settlement:
    """Settling one held reservation, computed in memory: written by the engine in the same
    transaction as the step's completion (:func:`settlement_statements`), or on its own when
    that completion is not written (:func:`settlement_apply`).

    Or, with ``block``, recording a call made from a block (``policies.blocks``), which moves
    no scope row: on its step's row by the completion that writes it (``policies.calls``), or
    else as a settled row of its own; ``reservation_id`` is then the block's and ``amount``
    the call's worst case taken from it."""

    reservation_id: int
    amount: Decimal
    #: What the call cost; None when it reported no usage (nothing spent: the money goes back).
    actual: Decimal | None
    scope_ids: tuple[int, ...]
    run_id: int | None
    step_id: int | None
    #: A call made from the block ``reservation_id``, recorded with this action and owner.
    block: bool = False
    action: str = ""
    owner: str = ""

    @classmethod
    def of(cls, reservation: Reservation, actual: Decimal | None) -> Settlement:
        return cls(
            reservation.pk,
            _dec(reservation.amount),
            None if actual is None else _money(actual, "actual"),
            tuple(reservation.scope_ids),
            reservation.run_id,
            reservation.step_id,
        )

    @property
    def charged(self) -> Decimal:
        """What enters ``spent``: at most the amount reserved (an overrun is recorded)."""
        return Decimal(0) if self.actual is None else min(self.actual, self.amount)


def settlement_statements(settlement: Settlement, now: datetime) -> list[tuple[str, list[Any]]]:
    """Two statements for the caller's transaction: the reservation leaves ``held``, then its
    scope rows move (locked in id order, as every multi-row statement here locks them), only
    if that first statement did settle it. A call made from a block: its record's INSERT."""
    if settlement.block:
        return [_block_call_insert(settlement, now)]
    table = _q(Reservation._meta.db_table)
    released = settlement.actual is None
    status = (ReservationStatus.RELEASED if released else ReservationStatus.SETTLED).value
    at = _at(now)
    ids = list(settlement.scope_ids)
    mark_sql = (
        f"UPDATE {table} SET {_q('status')} = %s, {_q('actual')} = %s, {_q('settled_at')} = %s "
        f"WHERE {_q('id')} = %s AND {_q('status')} = %s"
    )
    mark_params: list[Any] = [
        status,
        settlement.actual,
        at,
        settlement.reservation_id,
        ReservationStatus.HELD.value,
    ]
    if not ids:
        return [(mark_sql, mark_params)]
    move_sql = (
        f"UPDATE {_table()} SET {_q('reserved')} = {_q('reserved')} - %s, "
        f"{_q('spent')} = {_q('spent')} + %s, {_q('updated_at')} = %s "
        f"WHERE {_in_id_order(ids)} AND EXISTS (SELECT 1 FROM {table} WHERE {_q('id')} = %s "
        f"AND {_q('status')} = %s AND {_q('settled_at')} = %s)"
    )
    move_params: list[Any] = [
        settlement.amount,
        settlement.charged,
        at,
        *ids,
        settlement.reservation_id,
        status,
        at,
    ]
    return [(mark_sql, mark_params), (move_sql, move_params)]


def settlement_prepared(settlement: Settlement, now: datetime) -> tuple[Prepared, list[Any]]:
    """:func:`settlement_statements` as ONE prepared statement, for a PostgreSQL batch: the
    reservation leaves ``held`` and, only if it did, its scope rows move (locked in id order).
    A call made from a block: its record's INSERT."""
    if settlement.block:
        params = _block_call_params(settlement, now)
        return _block_call_prepared(), [str(v) if isinstance(v, Decimal) else v for v in params]
    released = settlement.actual is None
    status = (ReservationStatus.RELEASED if released else ReservationStatus.SETTLED).value
    ids = "{" + ",".join(str(i) for i in sorted(settlement.scope_ids)) + "}"
    return _settle_prepared(), [
        settlement.reservation_id,
        status,
        None if settlement.actual is None else str(settlement.actual),
        now,
        ids,
        str(settlement.amount),
        str(settlement.charged),
    ]


@cache
def _settle_prepared() -> Prepared:
    table, reservations = _table(), _q(Reservation._meta.db_table)
    held = ReservationStatus.HELD.value
    sql = f"""WITH mark AS (
        UPDATE {reservations} SET status = $2, actual = $3, settled_at = $4
        WHERE id = $1 AND status = '{held}'{BY_KEY} RETURNING id
    ), locked AS (
        SELECT id FROM {table} WHERE {_ids_in("$5")} AND EXISTS (SELECT 1 FROM mark)
        ORDER BY id FOR UPDATE
    )
    UPDATE {table} s SET reserved = s.reserved - $6, spent = s.spent + $7, updated_at = $4
    WHERE s.id IN (SELECT id FROM locked)"""
    return Prepared(
        sql, ["bigint", "text", "numeric", "timestamptz", "bigint[]", "numeric", "numeric"]
    )


def settlements_prepared(
    settlements: Sequence[Settlement], now: datetime
) -> tuple[Prepared, list[Any]]:
    """Several budget blocks' settlements as ONE prepared statement (PostgreSQL): each block
    leaves ``held``, and every scope row any of them counts against is locked (in id order)
    and moved once, by the sums of the blocks that did leave ``held`` (one the reaper released
    meanwhile moves nothing). The rows every worker shares are then written once for the lot
    instead of once per block."""
    rows: list[dict[str, Any]] = []
    scopes: set[int] = set()
    for s in settlements:
        released = s.actual is None
        rows.append(
            {
                "id": s.reservation_id,
                "status": (
                    ReservationStatus.RELEASED if released else ReservationStatus.SETTLED
                ).value,
                "actual": None if released else str(s.actual),
                "amount": str(s.amount),
                "charged": str(s.charged),
                "scopes": list(s.scope_ids),
            }
        )
        scopes.update(s.scope_ids)
    return _settle_many_prepared(), [
        json.dumps(rows),
        now,
        _array([s.reservation_id for s in settlements]),
        _array(scopes),
    ]


@cache
def _settle_many_prepared() -> Prepared:
    table, reservations = _table(), _q(Reservation._meta.db_table)
    held = ReservationStatus.HELD.value
    sql = f"""WITH s AS (
        SELECT * FROM jsonb_to_recordset($1) AS x(id bigint, status text, actual numeric,
            amount numeric, charged numeric, scopes bigint[])
    ), mark AS (
        UPDATE {reservations} r SET status = s.status, actual = s.actual, settled_at = $2
        FROM s WHERE r.id = s.id AND {_ids_in("$3", "r.")} AND r.status = '{held}'{BY_KEY}
        RETURNING r.id
    ), d AS (
        SELECT u.id, sum(s.amount) AS freed, sum(s.charged) AS charged
        FROM s JOIN mark ON mark.id = s.id CROSS JOIN LATERAL unnest(s.scopes) AS u(id)
        GROUP BY u.id
    ), locked AS (
        SELECT t.id FROM {table} t WHERE {_ids_in("$4", "t.")} AND t.id IN (SELECT id FROM d)
        ORDER BY t.id FOR UPDATE
    )
    UPDATE {table} t SET reserved = t.reserved - d.freed, spent = t.spent + d.charged,
           updated_at = $2
    FROM d WHERE t.id = d.id AND t.id IN (SELECT id FROM locked)
    RETURNING t.id"""
    return Prepared(sql, ["jsonb", "timestamptz", "bigint[]", "bigint[]"])


def settlements_apply(settlements: Sequence[Settlement]) -> None:
    """Settle budget blocks on their own, together (:func:`settlements_prepared`, in one
    transaction on PostgreSQL; one by one elsewhere)."""
    if not settlements:
        return
    if connection.vendor != "postgresql":
        for settlement in settlements:
            settlement_apply(settlement)
        return
    with transaction.atomic():
        execute_prepared(*settlements_prepared(settlements, timezone.now()))


def settle_hold_prepared(
    settlement: Settlement, request: HoldRequest
) -> tuple[Prepared, list[Any]]:
    """ONE prepared statement that settles ``settlement`` and makes ``request``'s reservation,
    for a step's completion that claims its successor when both count against the same scope
    rows: each row is locked and updated once (the freed and charged amounts and the new one
    together), the successor's amount added only if it fits after the settlement. Its one row
    answers the hold as :func:`hold_statements`' does (:func:`hold_answer`); the settlement is
    made whatever the answer."""
    released = settlement.actual is None
    status = (ReservationStatus.RELEASED if released else ReservationStatus.SETTLED).value
    ids = "{" + ",".join(str(i) for i in sorted(settlement.scope_ids)) + "}"
    block = request.most is not None
    return _settle_hold_prepared(request.guard, request.guard_types, request.kind, block), [
        settlement.reservation_id,
        status,
        None if settlement.actual is None else str(settlement.actual),
        request.now,
        ids,
        str(settlement.amount),
        str(settlement.charged),
        len(request.scopes),
        str(request.amount),
        request.run_id,
        request.step_id,
        request.action,
        request.owner,
        request.expires_at,
        *request.guard_params,
        *([str(request.most)] if block else []),
    ]


@cache
def _settle_hold_prepared(
    guard: str, guard_types: tuple[str, ...], kind: str, block: bool
) -> Prepared:
    table, reservations = _table(), _q(Reservation._meta.db_table)
    held = ReservationStatus.HELD.value
    types = ["bigint", "text", "numeric", "timestamptz", "bigint[]", "numeric", "numeric"]
    types += ["integer", "numeric", "bigint", "bigint", "text", "text", "timestamptz", *guard_types]
    fits_guard = (
        f" AND {guard.format(*(f'${i}' for i in range(15, len(types) + 1)))}" if guard else ""
    )
    most = None
    if block:  # a block's most: the last parameter
        types.append("numeric")
        most = f"${len(types)}"
    sql = f"""WITH mark AS (
        UPDATE {reservations} SET status = $2, actual = $3, settled_at = $4
        WHERE id = $1 AND status = '{held}'{BY_KEY} RETURNING id
    ), d AS (
        SELECT CASE WHEN EXISTS (SELECT 1 FROM mark) THEN $6 ELSE 0 END AS freed,
               CASE WHEN EXISTS (SELECT 1 FROM mark) THEN $7 ELSE 0 END AS charged
    ), locked AS (
        SELECT t.id, t.kind, t.key, t.spent + d.charged AS spent, t.reserved - d.freed AS reserved,
               t."limit", t.soft_ratio
        FROM {table} t, d WHERE {_ids_in("$5", "t.")} ORDER BY t.id FOR UPDATE OF t
    ), ok AS (
        SELECT count(*) = $8 AND coalesce(bool_and(spent + reserved + $9 <= "limit"), false)
               {fits_guard} AS fits, {_take("$9", most)} AS take, jsonb_agg(id ORDER BY id) AS ids
        FROM locked
    ), moved AS (
        UPDATE {table} s SET reserved = s.reserved - d.freed + CASE WHEN ok.fits THEN ok.take ELSE 0 END,
               spent = s.spent + d.charged, updated_at = $4
        FROM ok, d WHERE s.id IN (SELECT id FROM locked) AND (ok.fits OR EXISTS (SELECT 1 FROM mark))
        RETURNING s.id
    ), held AS (
        INSERT INTO {reservations} (run_id, step_id, action, amount, actual, scope_ids,
            status, owner, expires_at, created_at, settled_at, kind)
        SELECT $10, $11, $12, ok.take, NULL, ok.ids, '{held}', $13, $14, $4, NULL,
               '{ReservationKind(kind).value}'
        FROM ok WHERE ok.fits
        RETURNING id, scope_ids, amount
    )
    {_answer("(SELECT take FROM ok)", False)}"""
    return Prepared(sql, types)


def settlement_entries(settlement: Settlement) -> list[Entry]:
    """The audit entries a settlement records: an overrun, when the call cost more than was set
    aside (only the reserved amount is charged)."""
    actual = settlement.actual
    if actual is None or actual <= settlement.amount:
        return []
    data: dict[str, Any] = {
        "amount": str(settlement.amount),
        "actual": str(actual),
        "charged": str(settlement.charged),
        "overrun": True,
    }
    if settlement.block:
        data["block"] = True
    return [
        Entry(
            verb=Verb.CEILING_EXCEEDED,
            object_type="reservation",
            object_id=settlement.reservation_id,
            run_id=settlement.run_id,
            step_id=settlement.step_id,
            data=data,
        )
    ]


def _block_call_params(settlement: Settlement, now: datetime) -> list[Any]:
    """The values of a call made from a block, in :func:`_record_columns`' order: settled
    (released if it spent nothing), no scope rows (the block counts it)."""
    settled = ReservationStatus.RELEASED if settlement.actual is None else ReservationStatus.SETTLED
    values = {
        "run_id": settlement.run_id,
        "step_id": settlement.step_id,
        "action": settlement.action,
        "amount": settlement.amount,
        "actual": settlement.actual,
        "scope_ids": "[]",
        "status": settled.value,
        "owner": settlement.owner,
        "expires_at": now,
        "created_at": now,
        "settled_at": now,
        "kind": ReservationKind.CALL.value,
        "block_id": settlement.reservation_id,
    }
    return [values[c] for c in _record_columns()]


@cache
def _record_columns() -> tuple[str, ...]:
    return tuple(f.column for f in Reservation._meta.concrete_fields if f.column != "id")


@cache
def _block_call_sql() -> str:
    columns = _record_columns()
    return (
        f"INSERT INTO {_q(Reservation._meta.db_table)} ({', '.join(_q(c) for c in columns)}) "
        f"VALUES ({', '.join(['%s'] * len(columns))})"
    )


def _block_call_insert(settlement: Settlement, now: datetime) -> tuple[str, list[Any]]:
    """The INSERT of a call made from a block, for a cursor of this database."""
    params = _block_call_params(settlement, now)
    return _block_call_sql(), [_at(v) if isinstance(v, datetime) else v for v in params]


@cache
def _block_call_prepared() -> Prepared:
    """:func:`_block_call_insert` prepared (its parameters in the same order)."""
    types = {
        "run_id": "bigint",
        "step_id": "bigint",
        "action": "text",
        "amount": "numeric",
        "actual": "numeric",
        "scope_ids": "jsonb",
        "status": "text",
        "owner": "text",
        "expires_at": "timestamptz",
        "created_at": "timestamptz",
        "settled_at": "timestamptz",
        "kind": "text",
        "block_id": "bigint",
    }
    columns = _record_columns()
    marks = ", ".join(f"${n}" for n in range(1, len(columns) + 1))
    return Prepared(
        f"INSERT INTO {_q(Reservation._meta.db_table)} ({', '.join(_q(c) for c in columns)}) "
        f"VALUES ({marks})",
        [types[c] for c in columns],
    )


def settlement_apply(settlement: Settlement) -> None:
    """Settle on its own (the step's completion was not written): release what was not spent,
    or charge the actual; a reservation the reaper released meanwhile (its attempt was taken
    for dead, but the call went through) is charged all the same. A call made from a block:
    its record, written on its own."""
    if settlement.block:
        now = timezone.now()
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(*_block_call_insert(settlement, now))
            audit_record_many(settlement_entries(settlement), now=now)
        return
    if settlement.actual is None:
        ceiling_release(settlement.reservation_id)
        return
    try:
        ceiling_settle(settlement.reservation_id, settlement.actual)
    except ReservationReleased:
        ceiling_charge_released(settlement.reservation_id, settlement.actual)
