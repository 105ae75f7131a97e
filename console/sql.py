"""Plain SQL for hot paths: INSERT many rows or UPDATE one row in one statement, converting
values through each model field (as the ORM does) but without compiling a query per call, and
a psycopg pipeline to send several statements in one round trip on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from django.db import connection, models


def is_postgres() -> bool:
    return connection.vendor == "postgresql"


@contextmanager
def pipeline() -> Iterator[None]:
    """Batch the statements issued inside into one round trip (PostgreSQL only).

    Inside an outer pipeline this adds nothing (psycopg would sync at every nested exit), so
    the outermost caller decides where the round trip happens: wrapping a whole transaction
    sends its last writes together with the COMMIT. Statements whose rowcount matters must not
    run pipelined: read results with RETURNING instead."""
    if not is_postgres():
        yield
        return
    connection.ensure_connection()
    raw = connection.connection
    if raw._pipeline is not None:  # already batching
        yield
        return
    with raw.pipeline():
        yield


# --- columns ----------------------------------------------------------------------------------


class _Table:
    def __init__(self, model: type[models.Model], *, with_pk: bool):
        self.model = model
        self.name = model._meta.db_table
        self.fields = [f for f in model._meta.concrete_fields if with_pk or not f.primary_key]
        self.columns = ", ".join(connection.ops.quote_name(f.column) for f in self.fields)
        self.placeholder = "(" + ", ".join(["%s"] * len(self.fields)) + ")"

    def row(self, obj: models.Model) -> list[Any]:
        return [f.get_db_prep_save(getattr(obj, f.attname), connection) for f in self.fields]


_tables: dict[tuple[type[models.Model], bool], _Table] = {}


def _table(model: type[models.Model], with_pk: bool) -> _Table:
    key = (model, with_pk)
    if key not in _tables:
        _tables[key] = _Table(model, with_pk=with_pk)
    return _tables[key]


# --- writes -----------------------------------------------------------------------------------


def insert(model: type[models.Model], objs: Sequence[models.Model], *, returning: bool = True) -> None:
    """INSERT the objects in one statement. Objects with a pk keep theirs; the others get
    theirs from RETURNING unless ``returning`` is off (ids nobody reads)."""
    if not objs:
        return
    with_pk = objs[0].pk is not None
    table = _table(model, with_pk)
    for obj in objs:
        # Copies the ids of related objects saved since this one was built (as bulk_create does).
        obj._prepare_related_fields_for_save(operation_name="insert")
    sql = f"INSERT INTO {table.name} ({table.columns}) VALUES " + ", ".join([table.placeholder] * len(objs))
    params = [value for obj in objs for value in table.row(obj)]
    with connection.cursor() as cursor:
        if with_pk:
            cursor.execute(sql, params)
            return
        if not returning:
            cursor.execute(sql, params)
            return
        cursor.execute(sql + " RETURNING id", params)
        for obj, (pk,) in zip(objs, cursor.fetchall(), strict=True):
            obj.pk = pk


def update(obj: models.Model, fields: Iterable[str]) -> None:
    """UPDATE one row's ``fields`` by primary key."""
    model = type(obj)
    meta = model._meta
    chosen = [meta.get_field(name) for name in fields]
    assignments = ", ".join(f"{connection.ops.quote_name(f.column)} = %s" for f in chosen)
    params = [f.get_db_prep_save(getattr(obj, f.attname), connection) for f in chosen]
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {meta.db_table} SET {assignments} WHERE id = %s", [*params, obj.pk])
