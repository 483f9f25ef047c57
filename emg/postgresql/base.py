"""Django's PostgreSQL backend, made to outlive a database server restart in long-lived processes.

Django checks a persistent connection (CONN_HEALTH_CHECKS) once per request cycle: its signals
reset the check. Flow runs, the runner's lease thread and long Celery tasks have no request cycle,
so a connection the server dropped (a restart, a failover, an idle timeout) failed their next
query. Here a connection on which the server spoke while it was idle (it does so only to say it
is going away), one left idle for more than EMG_DATABASE_IDLE_CHECK_SECONDS, or one that raised
a database error, is pinged (`SELECT 1`) before its next use outside a transaction and
replaced if it fails; a connection in use back to back is never pinged. Inside an atomic block
nothing is checked: a transaction cut off by a restart cannot be resumed on a new connection, and
fails as it must. A reconnect after a restart also waits for the server to accept connections
again, for up to EMG_DATABASE_RECONNECT_SECONDS; a process's first connection to a database waits
only when the server itself says it cannot take connections yet (starting up, shutting down: a
process started in the middle of a restart), so a wrong address fails at once.
"""

import logging
import select
import time
from typing import Any

from django.conf import settings
from django.db.backends.postgresql import base
from psycopg import OperationalError

logger = logging.getLogger(__name__)

# The databases this process has been connected to (host, port, name), whichever wrapper connected:
# a wrapper of its own made later (the tick lock makes one per tick) waits for a restart too.
_connected_before: set[tuple[str, str, str]] = set()
# SQLSTATE cannot_connect_now: "the database system is starting up" (or shutting down, or in recovery).
CANNOT_CONNECT_NOW = "57P03"


def server_cannot_connect_now(error: OperationalError) -> bool:
    """The server answered, and said it is restarting: the address is right, so waiting is worth it."""
    sqlstate = getattr(error, "sqlstate", None) or getattr(getattr(error, "diag", None), "sqlstate", None)
    return sqlstate == CANNOT_CONNECT_NOW or "the database system is" in str(error)


class DatabaseWrapper(base.DatabaseWrapper):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_used = time.monotonic()

    def close_if_health_check_failed(self) -> None:
        now = time.monotonic()
        # Only in autocommit mode: leaving a transaction, Django turns autocommit back on through
        # here, and a ping then (the connection not yet in autocommit) would open another one.
        checking = (
            self.connection is not None
            and not self.in_atomic_block
            and self.autocommit
            and (
                self.errors_occurred
                or now - self._last_used > settings.EMG_DATABASE_IDLE_CHECK_SECONDS
                or self._server_spoke()
            )
        )
        if checking:
            self.health_check_done = False
        super().close_if_health_check_failed()
        if checking and self.connection is not None:
            self.errors_occurred = False  # it answered the ping
        self._last_used = now

    def _server_spoke(self) -> bool:
        """Whether the server sent something on an idle connection: between statements it sends
        nothing, unless it is going away ("terminating connection due to administrator command",
        then EOF). One non-blocking poll of the socket, no round trip: this catches a restart
        however recently the connection was used; the idle ping, a connection dropped in silence."""
        try:
            # poll, not select: a process with more than 1024 files open still gets an answer.
            poller = select.poll()
            poller.register(self.connection.pgconn.socket, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError, OperationalError):
            return True

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        # Django's connect() sets autocommit next, which checks the connection first: a new one
        # counts as just used (a ping now would open a transaction before autocommit is set).
        database = (
            str(self.settings_dict.get("HOST")),
            str(self.settings_dict.get("PORT")),
            str(self.settings_dict.get("NAME")),
        )
        if database not in _connected_before:
            try:
                connection = super().get_new_connection(conn_params)
            except OperationalError as error:
                if not server_cannot_connect_now(error):
                    raise
            else:
                _connected_before.add(database)
                self._last_used = time.monotonic()
                return connection
            _connected_before.add(database)
        deadline = time.monotonic() + settings.EMG_DATABASE_RECONNECT_SECONDS
        delay = 0.2
        while True:
            try:
                connection = super().get_new_connection(conn_params)
                self._last_used = time.monotonic()
                return connection
            except OperationalError as error:
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning(
                    "the database refuses a new connection (%s); trying again in %.1f s",
                    str(error).strip().splitlines()[0] if str(error).strip() else error,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
