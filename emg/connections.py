"""Statements that must not be lost to a database restart landing on them.

The backend (emg.postgresql) replaces a connection the server dropped before its next use, but a
statement in flight when the server goes away fails: a process that ran `SELECT` a microsecond
before a restart sends its next statement down a connection the server is closing. For a write
that is safe to repeat, the caller can say so and have it sent once more on a new connection.

A flow, which re-runs from the top by design, can go further: `from_the_top_if_disconnected` runs
its body again, in the same process, when the database went away under any of its statements.
"""

import functools
import logging
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import psycopg
from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, connections

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
# SQLSTATEs that say the server went away, not that it refused a statement: class 08 (connection
# exception) and the shutdown codes of class 57 (not 57014, a statement timeout or cancel).
SERVER_GONE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "57P04", "57P05"})
# One restart costs one or two attempts (a statement cut off, then perhaps the next one before the
# backend noticed); more than this is an outage the reconciler's re-runs are there for.
FROM_THE_TOP_ATTEMPTS = 3


def lost_connection(error: BaseException) -> bool:
    """`error` (or what caused it) is the database connection lost, not a statement refused."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, psycopg.OperationalError | psycopg.InterfaceError):
            sqlstate = seen.sqlstate
            # No SQLSTATE: libpq lost the socket ("server closed the connection unexpectedly").
            return sqlstate is None or sqlstate.startswith("08") or sqlstate in SERVER_GONE_SQLSTATES
        if isinstance(seen, InterfaceError):  # Django's "connection already closed"
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def once_more_if_disconnected(operation: Callable[[], T], *, what: str, using: str = DEFAULT_DB_ALIAS) -> T:
    """`operation()`; if the connection died under it, outside a transaction, `operation()` again.

    Only for operations that are idempotent, or whose failed first try cannot have applied
    (a statement the server refused while shutting down was rolled back). Inside an atomic block
    nothing is repeated: the transaction is lost with its connection and must fail as a whole."""
    connection = connections[using]
    try:
        return operation()
    except OperationalError as error:
        if connection.in_atomic_block or connection.is_usable():
            raise
        logger.warning("%s: the database connection was lost (%s); once more on a new one", what, error)
        connection.close()
        return operation()


def from_the_top_if_disconnected(body: Callable[P, T]) -> Callable[P, T]:
    """Run `body` again from its first line when the database connection was lost under it.

    For flow functions, which must be correct when re-run from the top anyway (a resume or a
    re-run by the reconciler does exactly that): a restart of PostgreSQL that cuts off one of the
    flow's statements costs it a pass from the top in the same process, not a failed flow run and
    a re-run. Whatever that statement was (a compare-and-set whose answer never came back, say),
    the pass from the top reads what the database holds now. Put it under `@flow`, so the flow
    run's state sees nothing. An error that is not a lost connection, and a connection lost
    FROM_THE_TOP_ATTEMPTS times in a row, are raised as they are."""

    @functools.wraps(body)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        passes = 1
        while True:
            try:
                return body(*args, **kwargs)
            except Exception as error:
                if passes == FROM_THE_TOP_ATTEMPTS or not lost_connection(error):
                    raise
                passes += 1
                logger.warning(
                    "%s: the database connection was lost (%s); from the top again (pass %s of %s)",
                    body.__name__,
                    error,
                    passes,
                    FROM_THE_TOP_ATTEMPTS,
                )
                # The backend's next connection waits out the restart (EMG_DATABASE_RECONNECT_SECONDS).
                connections.close_all()

    return run
