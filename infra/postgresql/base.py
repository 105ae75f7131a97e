"""Django's PostgreSQL backend, plus batches in flight.

A worker sends a step's completion (``infra.sql.Batch.send``) and starts the next step
before the answer is back. Until it is read, the connection cannot carry another statement,
so every way Django uses a connection (a cursor, a transaction, a health check, closing it)
reads the batch's outcome first. Reading only tells the client what happened: the server runs
and commits the batch either way. The engine acts on the outcome where it asks for it
(``InFlight.result``)."""

from __future__ import annotations

from typing import Any

from django.db.backends.postgresql import base


class DatabaseWrapper(base.DatabaseWrapper):
    #: ``infra.sql.Batch.send`` may leave a batch in flight on connections of this backend.
    supports_batches_in_flight = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The batch sent on this connection and not read yet (a ``infra.sql.InFlight``).
        self.in_flight: Any = None

    def settle(self) -> None:
        """Read the outcome of the batch in flight, if any: the connection is free again."""
        if self.in_flight is not None:
            self.in_flight.receive()

    def create_cursor(self, name: str | None = None) -> Any:
        self.settle()
        return super().create_cursor(name)

    def _set_autocommit(self, autocommit: bool) -> None:
        self.settle()
        super()._set_autocommit(autocommit)

    def _commit(self) -> Any:
        self.settle()
        return super()._commit()

    def _rollback(self) -> Any:
        self.settle()
        return super()._rollback()

    def is_usable(self) -> bool:
        self.settle()
        return bool(super().is_usable())

    def _close(self) -> Any:
        self.settle()
        return super()._close()
