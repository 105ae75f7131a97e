"""Plain SQL for hot paths: INSERT many rows or UPDATE one row in one statement, converting
values through each model field (as the ORM does) but without compiling a query per call, and
a psycopg pipeline to send several statements in one round trip on PostgreSQL.

A :class:`Batch` (PostgreSQL) goes further: its statements are prepared once per connection
(SQL ``PREPARE``) and executed by name with a few parameters each, rows travelling as one JSON
document per statement (``jsonb_populate_recordset``). The server neither parses nor plans
them again, and the client renders a handful of literals instead of every column value."""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import cache
from typing import Any, TypeVar, cast

from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models.base import ModelState
from django.utils import timezone
from psycopg import generators
from psycopg.pq import ExecStatus

M = TypeVar("M", bound=models.Model)


def db() -> BaseDatabaseWrapper:
    """The default connection itself: the ``django.db.connection`` proxy costs a thread-local
    lookup on every attribute, which adds up in a loop over fields."""
    return connections[DEFAULT_DB_ALIAS]


@contextmanager
def pipeline() -> Iterator[None]:
    """Batch the statements issued inside into one round trip (PostgreSQL only).

    Inside an outer pipeline this adds nothing (psycopg would sync at every nested exit), so
    the outermost caller decides where the round trip happens: wrapping a whole transaction
    sends its last writes together with the COMMIT. Statements whose rowcount matters must not
    run pipelined: read results with RETURNING instead."""
    conn = db()
    if conn.vendor != "postgresql":
        yield
        return
    conn.ensure_connection()
    raw = conn.connection
    if raw._pipeline is not None:  # already batching
        yield
        return
    with raw.pipeline():
        yield


def from_row(model: type[M], row: Sequence[Any]) -> M:
    """The instance of ``model`` whose concrete fields' columns, in field order, are ``row``:
    values converted as the ORM's compiler converts them."""
    return model.from_db(db().alias, attnames(model), _convert(model, row))


@cache
def attnames(model: type[models.Model]) -> list[str]:
    """The attribute names of ``model``'s concrete fields, in the order its columns have."""
    return [f.attname for f in model._meta.concrete_fields]


def _convert(model: type[models.Model], row: Sequence[Any]) -> list[Any]:
    if len(row) != len(model._meta.concrete_fields):
        raise ValueError(
            f"{len(row)} values for the {len(model._meta.concrete_fields)} columns of {model.__name__}"
        )
    out = list(row)
    conn = db()
    for index, col, converters in _converters(model):
        value = out[index]
        for converter in converters:
            value = converter(value, col, conn)
        out[index] = value
    return out


_converter_cache: dict[tuple[str, type[models.Model]], list[tuple[int, Any, list[Any]]]] = {}


def _converters(model: type[models.Model]) -> list[tuple[int, Any, list[Any]]]:
    """(position, column, converters) of the fields that have converters: the backend's first,
    then the field's, as the ORM's compiler does (on SQLite the backend's make datetimes aware;
    the field's alone leave them naive)."""
    key = (db().vendor, model)
    if key not in _converter_cache:
        entries = []
        for index, field in enumerate(model._meta.concrete_fields):
            col = field.get_col(model._meta.db_table)
            # Ignored below: django-stubs 5.2 lacks Field.get_db_converters, which Django's Field has.
            converters = [*db().ops.get_db_converters(col), *field.get_db_converters(db())]  # type: ignore[attr-defined]  # missing from django-stubs (above)
            if converters:
                entries.append((index, col, converters))
        _converter_cache[key] = entries
    return _converter_cache[key]


#: Follows the status in a prepared statement that finds its row by primary key and checks its
#: status (``WHERE id = $1 AND status = 'queued' COLLATE "C"``), so that the status is no access
#: path. A partial index of every row in one status (``step_queued_idx``, ``step_running_idx``,
#: ``reservation_held_idx``) matches the plain comparison, and a plan made while the table was
#: new (a worker keeps its generic plan for the connection's life) read that whole index, dead
#: entries and all, and filtered on the id: thousands of entries per claim, fence or settlement.
#: A comparison in another collation proves nothing about the index's predicate, and equality
#: of these ASCII values is the same in every collation.
BY_KEY = ' COLLATE "C"'


class Prepared:
    """A statement prepared once per connection and then executed by name (PostgreSQL).

    ``sql`` uses ``$1``, ``$2``… for its parameters, whose types are ``types``."""

    def __init__(self, sql: str, types: Sequence[str]) -> None:
        self.sql = sql
        self.types = tuple(types)
        self.name = "sbx_" + hashlib.sha1(f"{sql}|{self.types}".encode()).hexdigest()[:20]
        self.execute = f"EXECUTE {self.name}(" + ", ".join(["%s"] * len(self.types)) + ")"

    def definition(self) -> str:
        return f"PREPARE {self.name}({', '.join(self.types)}) AS {self.sql}"


#: Names of the statements prepared on each (psycopg) connection: a session's prepared
#: statements live as long as it does, and a new connection starts with none.
_prepared_on: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def ensure_prepared(statements: Iterable[Prepared]) -> None:
    """PREPARE the statements this connection does not have yet (one round trip, if any)."""
    conn = db()
    conn.ensure_connection()
    done = _prepared_on.setdefault(conn.connection, set())
    missing = {s.name: s for s in statements if s.name not in done}
    if not missing:
        return
    with conn.cursor() as cursor:
        cursor.execute(";\n".join(s.definition() for s in missing.values()))
    done.update(missing)


def forget_prepared() -> None:
    """This connection lost its prepared statements (``DISCARD ALL``, ``DEALLOCATE``)."""
    conn = db()
    if conn.connection is not None:
        _prepared_on.pop(conn.connection, None)


def lost_prepared(exc: BaseException) -> bool:
    """Whether ``exc`` says a prepared statement does not exist on the server (26000)."""
    seen: BaseException | None = exc
    while seen is not None:
        if getattr(seen, "sqlstate", None) == "26000":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def execute_prepared(statement: Prepared, params: Sequence[Any]) -> Any:
    """Execute ``statement`` on the default connection; returns the cursor's first row."""
    for attempt in (1, 2):
        ensure_prepared([statement])
        try:
            with db().cursor() as cursor:
                cursor.execute(statement.execute, params)
                return cursor.fetchone()
        except DatabaseError as exc:
            if attempt == 2 or not lost_prepared(exc) or db().in_atomic_block:
                raise
            forget_prepared()
    raise AssertionError("unreachable")


class Batch:
    """Statements collected to go to PostgreSQL as ONE multi-statement string, in autocommit
    mode: one round trip, executed as one implicit transaction (all or nothing), committed when
    it returns. For writes that need no results back.

    The string is rendered here: the parameters of prepared statements (JSON text, ids, a
    worker's name, timestamps) as SQL literals by :func:`literal`, anything else by psycopg's
    client-side binding (``mogrify``)."""

    def __init__(self) -> None:
        #: (sql with %s placeholders, params, the prepared statement it executes or None)
        self.statements: list[tuple[str, Sequence[Any], Prepared | None]] = []
        self.prepared: list[Prepared] = []
        #: Statements (by position) whose rows are kept when the batch runs, besides the last.
        self.keep: set[int] = set()
        #: The rows of the statements in ``keep``, once the batch has run (position -> rows).
        self.kept: dict[int, list[Any]] = {}

    def add(self, sql: str, params: Sequence[Any], *, keep: bool = False) -> int:
        """Add a statement; with ``keep``, its rows are kept (:attr:`kept`). Returns its position."""
        self.statements.append((sql, params, None))
        return self._kept(keep)

    def add_prepared(
        self, statement: Prepared, params: Sequence[Any], *, keep: bool = False
    ) -> int:
        self.prepared.append(statement)
        self.statements.append((statement.execute, params, statement))
        return self._kept(keep)

    def _kept(self, keep: bool) -> int:
        position = len(self.statements) - 1
        if keep:
            self.keep.add(position)
        return position

    def extend(self, other: Batch) -> None:
        """Append ``other``'s statements, to run in this batch's transaction after its own."""
        offset = len(self.statements)
        self.statements.extend(other.statements)
        self.prepared.extend(other.prepared)
        self.keep.update(offset + position for position in other.keep)
        other.keep = set()  # its positions are this batch's now

    def render(self, cursor: Any) -> str:
        """The batch as one SQL string, for ``cursor`` (a psycopg client-side binding cursor)."""
        fast = cursor.connection.info.parameter_status("standard_conforming_strings") == "on"
        parts = []
        for sql, params, statement in self.statements:
            if statement is not None and fast:
                literals = [literal(value) for value in params]
                if None not in literals:
                    parts.append(
                        f"EXECUTE {statement.name}({', '.join(cast('list[str]', literals))})"
                    )
                    continue
            parts.append(sql if not params and "%" not in sql else cursor.mogrify(sql, params))
        return ";\n".join(parts)

    def send(self) -> InFlight:
        """Send the batch and return at once, without its outcome: the caller goes on working
        while the server runs and commits it, and reads the outcome from the returned handle
        (``result()``). Until then the connection carries nothing else; a connection of the
        ``infra.postgresql`` backend reads the outcome first whenever it is used again.
        Elsewhere (another backend, query logging, inside a transaction) the batch runs now."""
        conn = db()
        if (
            not getattr(conn, "supports_batches_in_flight", False)
            or conn.in_atomic_block
            or conn.execute_wrappers
            or conn.queries_logged
        ):
            return InFlight.finished(self, self.run())
        conn.settle()  # type: ignore[attr-defined]  # an earlier batch still in flight is read first
        ensure_prepared(self.prepared)
        raw = conn.connection
        cursor = raw.cursor()
        with conn.wrap_database_errors:
            text = self.render(cursor)
            with raw.lock:
                raw.wait(cursor._start_query())
                raw.pgconn.send_query(text.encode(raw.info.encoding))
                raw.wait(generators.send(raw.pgconn))
        handle = InFlight(self, conn, cursor)
        conn.in_flight = handle  # type: ignore[attr-defined]  # infra.postgresql's DatabaseWrapper
        return handle

    def run_in_transaction(self) -> list[Any] | None:
        """Run the batch inside the caller's transaction (which commits it, or rolls it back
        with the caller's other writes); returns the rows of its last statement, if any."""
        conn = db()
        if not conn.in_atomic_block:
            raise RuntimeError(
                "run_in_transaction needs a transaction; use run() to commit by itself"
            )
        ensure_prepared(self.prepared)
        with conn.cursor() as cursor:
            raw = cursor.cursor
            with conn.wrap_database_errors:
                text = self.render(raw)
            if conn.execute_wrappers or conn.queries_logged:
                cursor.execute(text)
            else:
                with conn.wrap_database_errors:
                    raw.execute(text, prepare=False)
            return self._read(raw)

    def _read(self, cursor: Any) -> list[Any] | None:
        """Walk ``cursor``'s result sets (one per statement): keep the rows of the statements
        in :attr:`keep`; return the rows of the last one, if it returns rows."""
        self.kept = {}
        position = 0
        while True:
            result = cursor.pgresult
            rows = (
                cursor.fetchall()
                if result is not None and result.status == ExecStatus.TUPLES_OK
                else None
            )
            if position in self.keep and rows is not None:
                self.kept[position] = rows
            if not cursor.nextset():
                return rows
            position += 1

    def run(self) -> list[Any] | None:
        """Run the batch; returns the rows of its last statement if that one returns rows."""
        conn = db()
        if conn.in_atomic_block:
            raise RuntimeError("a Batch commits by itself; run it outside transaction.atomic()")
        for attempt in (1, 2):
            ensure_prepared(self.prepared)
            try:
                with conn.cursor() as cursor:
                    raw = cursor.cursor  # psycopg's client-side binding cursor
                    with conn.wrap_database_errors:  # a value psycopg refuses: Django's DataError
                        text = self.render(raw)
                    if conn.execute_wrappers or conn.queries_logged:
                        cursor.execute(text)  # through Django's wrappers (query logging, tools)
                    else:
                        with conn.wrap_database_errors:
                            # A one-off string: psycopg's own statement preparation is no use.
                            raw.execute(text, prepare=False)
                    return self._read(raw)
            except DatabaseError as exc:
                # Nothing was written (the implicit transaction rolled back): prepare again.
                if attempt == 2 or not lost_prepared(exc):
                    raise
                forget_prepared()
        raise AssertionError("unreachable")


class InFlight:
    """A batch sent by :meth:`Batch.send` whose outcome has not been read yet. The server runs
    and commits it (or rolls it all back) whether or not anyone reads; reading tells which."""

    def __init__(self, batch: Batch, conn: BaseDatabaseWrapper | None, cursor: Any) -> None:
        self._batch = batch
        self._conn = conn
        self._cursor = cursor
        self._received = conn is None
        self._rows: list[Any] | None = None
        self._error: BaseException | None = None

    @classmethod
    def finished(cls, batch: Batch, rows: list[Any] | None) -> InFlight:
        """A handle for a batch that already ran (synchronously)."""
        handle = cls(batch, None, None)
        handle._rows = rows
        return handle

    def receive(self) -> None:
        """Read the outcome now, if not done yet, and keep it for :meth:`result`; the
        connection is free again afterwards."""
        if self._received:
            return
        self._received = True
        conn, cursor = self._conn, self._cursor
        assert conn is not None
        if getattr(conn, "in_flight", None) is self:
            conn.in_flight = None  # type: ignore[attr-defined]  # infra.postgresql's DatabaseWrapper
        raw = cursor.connection
        try:
            with conn.wrap_database_errors:
                with raw.lock:
                    results = raw.wait(generators.fetch_many(raw.pgconn))
                cursor._check_results(results)
                cursor._set_results(results)
            self._rows = self._batch._read(cursor)
        except Exception as exc:  # kept for result(): the caller decides what a failure means
            self._error = exc

    def result(self) -> list[Any] | None:
        """The rows of the batch's last statement (if it returns rows), once the server has
        answered; raises the batch's error as :meth:`Batch.run` would."""
        self.receive()
        if self._error is not None and lost_prepared(self._error):
            # Nothing was written (the implicit transaction rolled back): prepare again.
            self._error = None
            forget_prepared()
            self._rows = self._batch.run()
        if self._error is not None:
            raise self._error
        return self._rows


def literal(value: Any) -> str | None:
    """``value`` as an SQL literal, for the few types hot statements pass (``None`` when it is
    another type: psycopg renders it then). Strings are quoted by doubling single quotes, which
    is exact while ``standard_conforming_strings`` is on (the caller checks; PostgreSQL's
    default since 9.1): backslashes are then ordinary characters. A string with a NUL byte,
    which PostgreSQL text cannot hold, is left to psycopg to refuse."""
    kind = type(value)
    if kind is str:
        return None if "\x00" in value else "'" + value.replace("'", "''") + "'"
    if kind is int:
        return str(value)
    if value is None:
        return "NULL"
    if kind is bool:
        return "true" if value else "false"
    if kind is datetime and value.tzinfo is not None:
        return "'" + value.isoformat() + "'"
    return None


# --- columns ----------------------------------------------------------------------------------


def _aware(field: models.Field[Any, Any]) -> Callable[[Any], Any]:
    def convert(value: datetime | None) -> str | None:
        if value is None:
            return None
        if timezone.is_naive(value):  # as DateTimeField does: warn, then assume the default zone
            value = cast("datetime", field.get_prep_value(value))
        return value.isoformat()

    return convert


def _text(value: Any) -> Any:
    return value if value is None or isinstance(value, str) else str(value)


def _same(value: Any) -> Any:
    return value


def _decimal(value: Any) -> Any:
    return None if value is None else str(value)


_INTEGER_TYPES = {
    "AutoField",
    "BigAutoField",
    "SmallAutoField",
    "IntegerField",
    "BigIntegerField",
    "SmallIntegerField",
    "PositiveIntegerField",
    "PositiveBigIntegerField",
    "PositiveSmallIntegerField",
    "ForeignKey",
    "OneToOneField",
    "BooleanField",
}


def _json_converter(field: models.Field[Any, Any]) -> Callable[[Any], Any] | None:
    """How a field's value travels in a JSON row for ``jsonb_populate_record``: what
    ``get_db_prep_save`` would send, as JSON (``None`` for types not handled here)."""
    kind = field.get_internal_type()
    if kind in _INTEGER_TYPES:
        return _same
    if kind == "JSONField":
        return _same if getattr(field, "encoder", None) is None else None
    if kind in ("CharField", "TextField"):
        return _text
    if kind == "DateTimeField":
        return _aware(field)
    if kind == "DecimalField":
        return _decimal
    if kind == "ForeignKey":  # the related row's id, as its own field travels
        return _json_converter(cast("models.ForeignKey[Any, Any]", field).target_field)
    return None


class _Table:
    def __init__(self, model: type[models.Model], *, with_pk: bool):
        self.model = model
        self.name = model._meta.db_table
        self.fields = [f for f in model._meta.concrete_fields if with_pk or not f.primary_key]
        self.columns = ", ".join(db().ops.quote_name(f.column) for f in self.fields)
        self.placeholder = "(" + ", ".join(["%s"] * len(self.fields)) + ")"
        converters = [_json_converter(f) for f in self.fields]
        self.json_ok = all(c is not None for c in converters)
        self.json_fields = [
            (f.column, f.attname, c) for f, c in zip(self.fields, converters, strict=True)
        ]
        #: (name, attname) of the foreign keys: a related object saved after it was assigned has
        #: its id copied in before the insert (Django's ``_prepare_related_fields_for_save``).
        self.relations = [(f.name, f.attname) for f in self.fields if f.is_relation]
        self.json_insert = Prepared(
            f"INSERT INTO {db().ops.quote_name(self.name)} ({self.columns}) "
            f"SELECT {self.columns} FROM jsonb_populate_recordset(NULL::{db().ops.quote_name(self.name)}, $1)",
            ["jsonb"],
        )

    def row(self, obj: models.Model, conn: BaseDatabaseWrapper) -> list[Any]:
        return [f.get_db_prep_save(getattr(obj, f.attname), conn) for f in self.fields]

    def json_row(self, obj: models.Model) -> dict[str, Any]:
        fields = self.json_fields
        return {column: convert(getattr(obj, attname)) for column, attname, convert in fields}  # type: ignore[misc]  # converters are never None when json_ok


_tables: dict[tuple[type[models.Model], bool], _Table] = {}


def _table(model: type[models.Model], with_pk: bool) -> _Table:
    key = (model, with_pk)
    if key not in _tables:
        _tables[key] = _Table(model, with_pk=with_pk)
    return _tables[key]


# --- writes -----------------------------------------------------------------------------------


def dumps(value: Any) -> str:
    """JSON text for a jsonb parameter (as Django's JSONField writes values: no custom encoder)."""
    return json.dumps(value, separators=(",", ":"))


def insert_rows(model: type[models.Model], rows: list[dict[str, Any]], *, batch: Batch) -> None:
    """Batch an INSERT of ``rows`` already in JSON form (column -> value, every column but the
    primary key, as :func:`json_row` makes them)."""
    if rows:
        batch.add_prepared(_table(model, False).json_insert, [dumps(rows)])


@cache
def _insert_with(model: type[models.Model], with_pk: bool, other: type[models.Model]) -> Prepared:
    """``model``'s JSON insert ($1) with ``other``'s ($2) in a data-modifying CTE."""
    table, also = _table(model, with_pk), _table(other, False)
    first = also.json_insert.sql.replace(", $1)", ", $2)")
    assert first.endswith(", $2)")
    return Prepared(f"WITH also AS ({first}) {table.json_insert.sql}", ["jsonb", "jsonb"])


def json_columns(
    model: type[models.Model], names: Sequence[str]
) -> list[tuple[str, str, Callable[[Any], Any]]]:
    """(column, attribute, converter) of the named fields, for JSON rows."""
    out = []
    for name in names:
        field = cast("models.Field[Any, Any]", model._meta.get_field(name))
        convert = _json_converter(field)
        if convert is None:
            raise ValueError(f"{model.__name__}.{name} cannot travel as JSON")
        out.append((field.column, field.attname, convert))
    return out


def insert(
    model: type[models.Model],
    objs: Sequence[models.Model],
    *,
    returning: bool = True,
    batch: Batch | None = None,
    also: tuple[type[models.Model], list[dict[str, Any]]] | None = None,
) -> None:
    """INSERT the objects in one statement. Objects with a pk keep theirs; the others get
    theirs from RETURNING unless ``returning`` is off (ids nobody reads). ``also`` (batched
    only): another table's rows in JSON form (as for :func:`insert_rows`), written by the same
    statement where it can (a statement fewer in the batch); neither table may refer to the
    other, since the statement writes both at once."""
    if also is not None and batch is None:
        raise ValueError("only a batched insert writes another table's rows with it")
    if also is not None and not also[1]:
        also = None
    if not objs:
        if also is not None and batch is not None:
            insert_rows(*also, batch=batch)
        return
    with_pk = objs[0].pk is not None
    table = _table(model, with_pk)
    for obj in objs:
        # Copies the ids of related objects saved since this one was built, or refuses an
        # unsaved one (as bulk_create does); only an id still missing can need it.
        cached = obj._state.fields_cache
        if any(
            getattr(obj, attname) is None and cached.get(name) is not None
            for name, attname in table.relations
        ):
            obj._prepare_related_fields_for_save(operation_name="insert")  # type: ignore[attr-defined]  # private Django API, not in django-stubs
    if batch is not None:
        if not with_pk and returning:
            raise ValueError("a batched insert cannot return ids: assign them first")
        if table.json_ok:
            rows = dumps([table.json_row(obj) for obj in objs])
            if also is not None:
                batch.add_prepared(_insert_with(model, with_pk, also[0]), [rows, dumps(also[1])])
                return
            batch.add_prepared(table.json_insert, [rows])
            return
        if also is not None:
            insert_rows(*also, batch=batch)
    sql = f"INSERT INTO {table.name} ({table.columns}) VALUES " + ", ".join(
        [table.placeholder] * len(objs)
    )
    conn = db()
    params = [value for obj in objs for value in table.row(obj, conn)]
    if batch is not None:
        batch.add(sql, params)
        return
    with conn.cursor() as cursor:
        if with_pk:
            cursor.execute(sql, params)
            return
        if not returning:
            cursor.execute(sql, params)
            return
        cursor.execute(sql + " RETURNING id", params)
        for obj, (pk,) in zip(objs, cursor.fetchall(), strict=True):
            obj.pk = pk


def update(obj: models.Model, fields: Sequence[str], *, batch: Batch | None = None) -> None:
    """UPDATE one row's ``fields`` by primary key."""
    conn = db()
    sql, chosen = _update_sql(type(obj), tuple(fields))
    params = [f.get_db_prep_save(getattr(obj, f.attname), conn) for f in chosen]
    if batch is not None:
        batch.add(sql, [*params, obj.pk])
        return
    with conn.cursor() as cursor:
        cursor.execute(sql, [*params, obj.pk])


_update_cache: dict[tuple[type[models.Model], tuple[str, ...]], tuple[str, list[Any]]] = {}


def _update_sql(model: type[models.Model], fields: tuple[str, ...]) -> tuple[str, list[Any]]:
    key = (model, fields)
    if key not in _update_cache:
        meta = model._meta
        chosen = [cast("models.Field[Any, Any]", meta.get_field(name)) for name in fields]
        assignments = ", ".join(f"{db().ops.quote_name(f.column)} = %s" for f in chosen)
        _update_cache[key] = (f"UPDATE {meta.db_table} SET {assignments} WHERE id = %s", chosen)
    return _update_cache[key]


# --- instances -------------------------------------------------------------------------------


def unsaved(model: type[M], **values: Any) -> M:
    """A new, unsaved instance of ``model`` with ``values`` and every other field's default, as
    ``model(**values)`` makes it, without that constructor's keyword handling (~30 µs a step on
    this hot path). A related object may be given by its field name, like the constructor's."""
    defaults, relations = _instance_spec(model)
    obj = model.__new__(model)
    obj._state = ModelState()
    attrs = {attname: default() if call else default for attname, default, call in defaults}
    for name, value in values.items():
        attname = relations.get(name)
        if attname is None:
            attrs[name] = value
        else:  # the related object: its id, and the object itself cached as the constructor does
            attrs[attname] = None if value is None else value.pk
            obj._state.fields_cache[name] = value
    obj.__dict__.update(attrs)
    return obj


@cache
def _instance_spec(model: type[models.Model]) -> tuple[list[tuple[str, Any, bool]], dict[str, str]]:
    defaults = []
    for field in model._meta.concrete_fields:
        if field.has_default() and callable(field.default):
            defaults.append((field.attname, field.default, True))
        else:
            defaults.append((field.attname, field.get_default(), False))
    relations = {f.name: f.attname for f in model._meta.concrete_fields if f.is_relation}
    return defaults, relations
