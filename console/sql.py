"""Plain SQL for hot paths: INSERT many rows or UPDATE one row in one statement, converting
values through each model field (as the ORM does) but without compiling a query per call, and
a psycopg pipeline to send several statements in one round trip on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

from django.db import DEFAULT_DB_ALIAS, connections, models
from django.db.backends.base.base import BaseDatabaseWrapper


def db() -> BaseDatabaseWrapper:
    """The default connection itself: the ``django.db.connection`` proxy costs a thread-local
    lookup on every attribute, which adds up in a loop over fields."""
    return connections[DEFAULT_DB_ALIAS]


def is_postgres() -> bool:
    return db().vendor == "postgresql"


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


class Batch:
    """Statements collected to go to PostgreSQL as ONE multi-statement string, in autocommit
    mode: one round trip, executed as one implicit transaction (all or nothing), committed when
    it returns. For writes that need no results back."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, Sequence[Any]]] = []

    def add(self, sql: str, params: Sequence[Any]) -> None:
        self.statements.append((sql, params))

    def run(self) -> None:
        conn = db()
        if conn.in_atomic_block:
            raise RuntimeError("a Batch commits by itself; run it outside transaction.atomic()")
        with conn.cursor() as cursor:
            raw = cursor.cursor  # psycopg's client-side binding cursor: it can mogrify
            text = ";\n".join(raw.mogrify(sql, params) for sql, params in self.statements)
            cursor.execute(text)


# --- columns ----------------------------------------------------------------------------------


class _Table:
    def __init__(self, model: type[models.Model], *, with_pk: bool):
        self.model = model
        self.name = model._meta.db_table
        self.fields = [f for f in model._meta.concrete_fields if with_pk or not f.primary_key]
        self.columns = ", ".join(db().ops.quote_name(f.column) for f in self.fields)
        self.placeholder = "(" + ", ".join(["%s"] * len(self.fields)) + ")"

    def row(self, obj: models.Model, conn: BaseDatabaseWrapper) -> list[Any]:
        return [f.get_db_prep_save(getattr(obj, f.attname), conn) for f in self.fields]


_tables: dict[tuple[type[models.Model], bool], _Table] = {}


def _table(model: type[models.Model], with_pk: bool) -> _Table:
    key = (model, with_pk)
    if key not in _tables:
        _tables[key] = _Table(model, with_pk=with_pk)
    return _tables[key]


# --- writes -----------------------------------------------------------------------------------


def insert(
    model: type[models.Model], objs: Sequence[models.Model], *, returning: bool = True, batch: Batch | None = None
) -> None:
    """INSERT the objects in one statement. Objects with a pk keep theirs; the others get
    theirs from RETURNING unless ``returning`` is off (ids nobody reads)."""
    if not objs:
        return
    with_pk = objs[0].pk is not None
    table = _table(model, with_pk)
    for obj in objs:
        # Copies the ids of related objects saved since this one was built (as bulk_create does).
        obj._prepare_related_fields_for_save(operation_name="insert")  # type: ignore[attr-defined]  # private Django API, not in django-stubs
    sql = f"INSERT INTO {table.name} ({table.columns}) VALUES " + ", ".join([table.placeholder] * len(objs))
    conn = db()
    params = [value for obj in objs for value in table.row(obj, conn)]
    if batch is not None:
        if not with_pk and returning:
            raise ValueError("a batched insert cannot return ids: assign them first")
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
