"""The engine's persistence: one interface, two implementations.

* :class:`~orchestration.store.plain.Store` is the plain one: the ORM, statement by statement, inside the
  caller's transaction. Embedded mode (SQLite) runs on it; the test suite also runs it on
  PostgreSQL, as the reference the fast implementation must agree with.
* :class:`~orchestration.store.postgresql.PostgresStore` keeps the measured fast paths: a
  claim in one statement, ids from reserved blocks, a whole transaction's writes as one
  multi-statement batch of prepared statements (one round trip, optionally sent without waiting
  for its answer), and the run row checked by version instead of locked.

Each process's runtime holds the store :func:`store_create` made for it; domain code never asks
which database it is talking to. What a store writes is a
:class:`~orchestration.changes.Changes`; what it loads for a decision is a
:class:`~orchestration.changes.Snapshot`.
"""

from __future__ import annotations

from django.conf import settings
from django.db import connection

from orchestration.store.plain import (
    LeaseLost,
    Pending,
    RunChanged,
    StepTaken,
    Store,
    WriteBatch,
    WriteRefused,
)
from orchestration.store.postgresql import PostgresStore

__all__ = [
    "LeaseLost",
    "Pending",
    "PostgresStore",
    "RunChanged",
    "StepTaken",
    "Store",
    "WriteBatch",
    "WriteRefused",
    "store_create",
]


def store_create() -> Store:
    """A store for the default database connection, for one process (its runtime owns it:
    the PostgreSQL store keeps id blocks and prepared statements). ``SIGNALBOX["STORE"] =
    "plain"`` forces the plain implementation on PostgreSQL too, to compare the two."""
    if connection.vendor == "postgresql" and settings.SIGNALBOX.get("STORE", "fast") != "plain":
        return PostgresStore()
    return Store()
