"""A long-lived process's Django connections outlive a PostgreSQL server restart (emg/postgresql).

A Python process of the product's settings, on a PostgreSQL server of this test's own, holds a
connection idle (as a flow waiting on ENA does), then the server restarts (`pg_ctl restart -m
fast`: every session cut off) and the process queries again, with no request cycle in between.
"""

import os
import subprocess
import sys
import time

import pytest

from devstack.processes import ROOT, wait_until
from devstack.services import free_port
from tests.e2e.chaos import OwnPostgres

# Queries, waits for a line on stdin (the restart happens meanwhile), queries again; then the same
# inside a transaction, which a restart must fail rather than replay on a new connection.
IDLE_THROUGH_RESTART = """
import sys
import time
import django
django.setup()
from django.db import connection, transaction
with connection.cursor() as cursor:
    cursor.execute("SELECT 1")
# A transaction idle for over a second before it commits: autocommit comes back on without a ping.
with transaction.atomic(), connection.cursor() as cursor:
    cursor.execute("SELECT 1")
    time.sleep(1.2)
# Closed (as CONN_MAX_AGE closes it) and opened again after idling: a new connection is not pinged
# before Django has set its autocommit, which a ping's implicit transaction would make impossible.
# Opened by a transaction (bulk_create's, say), which connects before any cursor does.
connection.close()
time.sleep(1.2)
with transaction.atomic(), connection.cursor() as cursor:
    cursor.execute("SELECT pg_backend_pid()")
    print("before", cursor.fetchone()[0], flush=True)
sys.stdin.readline()
with connection.cursor() as cursor:
    cursor.execute("SELECT pg_backend_pid()")
    print("after", cursor.fetchone()[0], flush=True)
with transaction.atomic():
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        print("in transaction", flush=True)
        sys.stdin.readline()
        try:
            cursor.execute("SELECT 1")
        except django.db.OperationalError as error:
            print("transaction cut off", type(error).__name__, flush=True)
            raise SystemExit(0)
print("transaction survived", flush=True)
"""


@pytest.fixture
def own_postgres(service_logs):
    postgres = OwnPostgres(free_port(), service_logs).start()
    yield postgres
    postgres.stop()


def product_process(script: str, own_postgres: OwnPostgres) -> subprocess.Popen:
    """A Python process of the product's settings on our PostgreSQL, talking through its stdio."""
    env = {
        "PATH": "/usr/bin:/bin",
        "DJANGO_SETTINGS_MODULE": "emg.settings",
        # Outside debug mode the product starts only with a secret key: the session's.
        "DJANGO_SECRET_KEY": os.environ["DJANGO_SECRET_KEY"],
        "DATABASE_URL": own_postgres.url(),
        "EMG_VAR_DIR": str(own_postgres.root),
    }
    return subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        cwd=ROOT,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_an_idle_connection_is_replaced_after_a_server_restart_and_a_transaction_is_not_replayed(own_postgres):
    process = product_process(IDLE_THROUGH_RESTART, own_postgres)
    try:
        before = process.stdout.readline().split()
        assert before[:1] == ["before"], process.stderr.read()
        own_postgres.restart()
        process.stdin.write("go\n")
        process.stdin.flush()
        after = process.stdout.readline().split()
        assert after[:1] == ["after"], process.stderr.read()
        assert after[1] != before[1]  # a new server session, found without an error reaching the caller
        assert process.stdout.readline().strip() == "in transaction"
        own_postgres.restart()
        process.stdin.write("go\n")
        process.stdin.flush()
        assert process.stdout.readline().split()[:2] == ["transaction", "cut"], process.stderr.read()
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        process.wait()


# Connected once; then, told to, opens a connection of a new wrapper (as the tick lock does) while
# the server is down, and says how long it waited.
NEW_WRAPPER_WHILE_DOWN = """
import sys
import time
import django
django.setup()
from django.db import connection, connections
with connection.cursor() as cursor:
    cursor.execute("SELECT 1")
print("ready", flush=True)
sys.stdin.readline()
started = time.monotonic()
wrapper = connections.create_connection("default")
with wrapper.cursor() as cursor:
    cursor.execute("SELECT 1")
print("connected", round(time.monotonic() - started, 1), flush=True)
"""


def test_a_process_that_was_connected_waits_for_a_server_that_is_restarting(own_postgres):
    process = product_process(NEW_WRAPPER_WHILE_DOWN, own_postgres)
    try:
        assert process.stdout.readline().strip() == "ready", process.stderr.read()
        own_postgres._pg_ctl("-m", "fast", "stop")
        process.stdin.write("go\n")
        process.stdin.flush()
        time.sleep(3)  # the outage: the server stays down this long
        own_postgres.start()
        answer = process.stdout.readline().split()
        assert answer[:1] == ["connected"], process.stderr.read()
        assert float(answer[1]) >= 2.5
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()


FIRST_CONNECTION = """
import time
import django
django.setup()
from django.db import connection
started = time.monotonic()
with connection.cursor() as cursor:
    cursor.execute("SELECT 1")
print("connected", round(time.monotonic() - started, 1), flush=True)
"""


def test_a_process_whose_first_connection_meets_a_server_going_down_waits_for_it_to_come_back(own_postgres):
    """A flow process started in the middle of a restart: the server answers that it is shutting
    down (SQLSTATE 57P03), so the address is right and the connection is worth waiting for."""
    import psycopg

    holder = psycopg.connect(own_postgres.url())  # a smart shutdown waits for every session to end
    own_postgres._as_postgres(
        str(own_postgres.BIN / "pg_ctl"), "-D", str(own_postgres.data), "-m", "smart", "-W", "stop"
    )

    def refuses_as_shutting_down() -> bool:
        try:
            psycopg.connect(own_postgres.url(), connect_timeout=2).close()
        except psycopg.OperationalError as error:
            return "shutting down" in str(error)
        return False

    wait_until(refuses_as_shutting_down, timeout=30, message="the server refuses new sessions: shutting down")
    process = product_process(FIRST_CONNECTION, own_postgres)
    try:
        time.sleep(2)  # the process is refused all this while; it must still be waiting, not failed
        assert process.poll() is None, process.stderr.read()
        holder.close()
        wait_until(
            lambda: not (own_postgres.data / "postmaster.pid").exists(), timeout=30, message="the server has shut down"
        )
        own_postgres.start()
        answer = process.stdout.readline().split()
        assert answer[:1] == ["connected"], process.stderr.read()
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()
