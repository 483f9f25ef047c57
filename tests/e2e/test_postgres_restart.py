"""A PostgreSQL server restart while flows run crashes nothing: every request completes, no re-run.

A stack of this module's own (Prefect runner, Celery worker and beat, on the session's Redis,
Prefect server and Slurm) whose Django database is on a PostgreSQL server of the test's own, so
restarting it (`pg_ctl restart -m fast`: every session cut off) touches no one else. The restart
lands while one request's flow is Running, mid-fetch from the slow fake ENA study (it answers
after 15 s) with its database connection idle, and the others' flows are running or suspended.
The test process talks to that database only through psycopg and a subprocess of the stack's own:
its own Django connection stays on pytest-django's test database.
"""

import subprocess
import sys
import uuid
from datetime import UTC, datetime

import psycopg
import pytest
from django.conf import settings

from devstack.processes import ROOT, wait_until
from devstack.services import free_port
from devstack.stack import Stack
from emg.models import AnalysisRequest, ReconcileTick
from tests.e2e.chaos import OwnPostgres
from tests.e2e.requests import state_names

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SLOW_STUDY = "PRJEB40408"  # the fake ENA answers it after 15 s
STUDIES = [SLOW_STUDY, "PRJEB40001", "PRJEB40002"]
COMPLETION_DEADLINE = 480

# Run by the stack's own Python with the stack's environment: requests saved in its database, their
# events published to its broker, exactly as a save in the Django admin would.
SAVE_REQUESTS = """
import sys
import django
django.setup()
from tests.e2e.requests import new_request
print(" ".join(str(new_request(accession).id) for accession in sys.argv[1:]))
"""


def rows(database_url: str, sql: str, params=()) -> list[tuple]:
    # A new connection each time: the server restarts under these queries.
    with psycopg.connect(database_url, connect_timeout=5) as connection:
        return connection.execute(sql, params).fetchall()


@pytest.fixture
def own_postgres(service_logs):
    postgres = OwnPostgres(free_port(), service_logs).start()
    yield postgres
    postgres.stop()


@pytest.fixture
def restart_stack(stack, own_postgres, service_logs):
    url = own_postgres.create_database("emg")
    env = {
        **stack.env,
        "DATABASE_URL": url,
        # Request ids start again at 1 in this database, and the Prefect server is the session's: keys
        # of its own. (Its ENA fetches are its own too: the slow study is fetched, not read from a cache.)
        "EMG_INSTANCE_NAMESPACE": f"pytest-{settings.TEST_SESSION}-pg-restart-{uuid.uuid4().hex[:8]}",
        # The cap counts every emg-tagged job of this Slurm user, other sessions' included.
        "EMG_MAX_ACTIVE_JOBS": "1000000",
    }
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    with stack.paused():
        own = Stack(env, service_logs, label="pg-restart")
        own.start()
        try:
            yield own, url
        finally:
            own.stop()


def test_a_database_restart_with_a_flow_mid_fetch_fails_no_flow_run_worker_or_tick(
    restart_stack, own_postgres, ena_server
):
    own, url = restart_stack
    ena_server.reset_counts()
    saved = subprocess.run(
        [sys.executable, "-c", SAVE_REQUESTS, *STUDIES],
        env=own.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    request_ids = [int(i) for i in saved.stdout.split()]
    requests_table, ticks_table = AnalysisRequest._meta.db_table, ReconcileTick._meta.db_table

    def slow_flow_mid_fetch():
        [(flow_run_id,)] = rows(url, f"SELECT flow_run_id FROM {requests_table} WHERE id = %s", [request_ids[0]])
        if flow_run_id is None or not ena_server.request_count(SLOW_STUDY):
            return None
        return flow_run_id if state_names(flow_run_id)[-1] == "Running" else None

    wait_until(
        slow_flow_mid_fetch, timeout=120, interval=0.2, message="the slow study's flow is Running, waiting for ENA"
    )
    restarted_at = datetime.now(UTC)
    own_postgres.restart()
    back_at = datetime.now(UTC)

    def finished():
        found = rows(
            url,
            f"SELECT id, status, status_reason, flow_reruns, flow_run_id FROM {requests_table} WHERE id = ANY(%s)",
            [request_ids],
        )
        return found if all(status in AnalysisRequest.FINAL_STATUSES for _, status, _, _, _ in found) else None

    try:
        outcome = wait_until(finished, timeout=COMPLETION_DEADLINE, interval=1, message="every request finished")
        assert {i: (status, reruns) for i, status, _, reruns, _ in outcome} == {
            i: (AnalysisRequest.Status.COMPLETED, 0) for i in request_ids
        }, outcome
    except AssertionError:
        print(own.logs())  # which statement the restart cut off, and in which process
        raise
    # The slow flow was mid-fetch: it stored what ENA answered after the restart, on a new connection.
    [(fetched_at,)] = rows(url, f"SELECT ena_fetched_at FROM {requests_table} WHERE id = %s", [request_ids[0]])
    assert fetched_at > back_at
    # No flow run crashed or failed, not even for a moment before a re-run.
    for _, _, _, _, flow_run_id in outcome:
        names = state_names(flow_run_id)
        assert not {"Crashed", "Failed"} & set(names), (flow_run_id, names)
    # Every tick after the restart finished without an error; ticks kept coming.
    ticks = rows(url, f"SELECT started_at, finished_at, report FROM {ticks_table} WHERE started_at >= %s", [back_at])
    assert len(ticks) >= 10
    assert [report for _, _, report in ticks if report and report.get("errors")] == []
    # The Celery workers (dispatch and tick), beat and runner logged no failure from the restart.
    for process in (own.worker, own.tick_worker, own.beat, own.runner):
        log = process.log_path.read_text(errors="replace")
        assert "OperationalError" not in log and "InterfaceError" not in log, (process.name, process.log_tail())
    print(f"restart took {(back_at - restarted_at).total_seconds():.1f}s")
