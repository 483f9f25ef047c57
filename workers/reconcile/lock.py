"""One tick at a time, without a TTL: the lock lives exactly as long as the process that holds it.

On PostgreSQL it is a session advisory lock taken on a connection of its own: a tick that is slow,
paused (SIGSTOP) or stuck in a retrying call keeps it, and a dead process or a dropped connection
releases it at once, so no expiry can hand a live tick's work to a second one. On SQLite (a laptop
demo) it is an flock on a file beside the database, with the same lifetime.

The lock is an economy, not the guarantee: every write of a tick is a compare-and-set (emg.jobs,
emg.requests), so even two ticks that overlap (a PostgreSQL restart drops the lock under a live
tick) never submit one attempt twice. `TickLock.still_held()` lets a tick stop early once its lock
is gone, before it calls sbatch again.
"""

import fcntl
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, TextIO

from django.conf import settings
from django.db import connections

logger = logging.getLogger(__name__)


def lock_key(namespace: str) -> int:
    """A signed 64-bit key, the same in every process of one instance and different between instances."""
    digest = hashlib.sha256(f"emg-reconcile-tick:{namespace}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class TickLock:
    """`acquire()` once; `still_held()` as often as wanted; `release()` (or the process's end) frees it."""

    def __init__(self, alias: str = "default", namespace: str | None = None):
        self.alias = alias
        self.key = lock_key(namespace or settings.EMG_INSTANCE_NAMESPACE)
        self.vendor = connections[alias].vendor
        self._connection: Any = None  # a Django DatabaseWrapper of its own
        self._file: TextIO | None = None

    def acquire(self, timeout: float = 0, interval: float = 0.2) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self._try_acquire():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    def _try_acquire(self) -> bool:
        if self.vendor == "postgresql":
            if self._connection is None:
                # Not Django's request-scoped connection: close_old_connections() must never drop the lock.
                self._connection = connections.create_connection(self.alias)
            with self._connection.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_lock(%s)", [self.key])
                return bool(cursor.fetchone()[0])
        path = Path(settings.VAR_DIR) / f"reconcile-{settings.EMG_INSTANCE_NAMESPACE}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(path, "a+")  # noqa: SIM115 (held open for the lock's whole life)
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            return False
        self._file = lock_file
        return True

    def still_held(self) -> bool:
        """False once the lock's connection is gone (and with it, on PostgreSQL, the lock)."""
        if self.vendor != "postgresql":
            return self._file is not None
        if self._connection is None:
            return False
        try:
            with self._connection.cursor() as cursor:
                # A bigint advisory key is shown as its high and low 32 bits, objsubid 1.
                cursor.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
                    "AND granted AND classid = %s::bigint::oid AND objid = %s::bigint::oid AND objsubid = 1",
                    [(self.key >> 32) & 0xFFFFFFFF, self.key & 0xFFFFFFFF],
                )
                return cursor.fetchone()[0] > 0
        except Exception as error:  # the connection died: so did the lock
            logger.warning("the reconcile tick lock's connection is gone (%s)", error)
            return False

    def release(self) -> None:
        if self._connection is not None:
            try:
                with self._connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(%s)", [self.key])
            except Exception as error:  # a dead connection has released it already
                logger.info("releasing the tick lock: %s", error)
            finally:
                self._connection.close()
                self._connection = None
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "TickLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def process_label() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"
