"""The tick lock has no TTL: a slow or frozen holder keeps it, a dead one frees it at once."""

import os
import signal
import subprocess
import sys
import time

import pytest
from django.db import connection

from devstack.processes import wait_until
from workers.reconcile.lock import TickLock, lock_key

# Not a transactional test: the locks are taken on connections of their own, and a flush at the end
# would race the session stack's workers, which may be running.
pytestmark = pytest.mark.django_db

# A namespace of this module's own: the session stack's tick worker, if it is running, takes the
# tick lock of the tests' instance at every beat.
NAMESPACE = f"tick-lock-test-{os.getpid()}"
FROZEN_SECONDS = float(os.environ.get("EMG_TEST_TICK_LOCK_FROZEN_SECONDS", "20"))

HOLDER = """
import sys, time, psycopg
connection = psycopg.connect(sys.argv[1], autocommit=True)
connection.execute("SELECT pg_advisory_lock(%s)", [int(sys.argv[2])])
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder():
    """Another process holding the tick lock, as a ticking worker does."""
    database = connection.settings_dict
    dsn = f"postgresql://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, dsn, str(lock_key(NAMESPACE))], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait(timeout=30)


def test_a_held_lock_is_refused_and_a_frozen_holder_keeps_it_for_as_long_as_it_is_frozen(holder):
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        frozen_since = time.monotonic()
        lock = TickLock(namespace=NAMESPACE)
        # An advisory lock has no expiry to wait out: it is the holder's session. Frozen for 20 s
        # (EMG_TEST_TICK_LOCK_FROZEN_SECONDS=65 outlasts the old Redis lock's 60 s) it is refused at every try.
        while time.monotonic() - frozen_since < FROZEN_SECONDS:
            assert not lock.acquire()
            time.sleep(5)
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    assert not TickLock(namespace=NAMESPACE).acquire()


def test_the_lock_is_free_the_moment_its_holder_dies(holder):
    lock = TickLock(namespace=NAMESPACE)
    assert not lock.acquire()
    holder.kill()
    holder.wait(timeout=30)
    assert wait_until(lambda: lock.acquire(), timeout=10, message="the dead holder's lock is free")
    assert lock.still_held()
    lock.release()


def test_still_held_turns_false_when_the_lock_connection_is_dropped():
    lock = TickLock(namespace=NAMESPACE)
    assert lock.acquire()
    pid = lock._connection.connection.info.backend_pid
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    assert wait_until(lambda: not lock.still_held(), timeout=10, message="the dropped lock is noticed")
    lock.release()
    again = TickLock(namespace=NAMESPACE)
    assert again.acquire()
    again.release()
