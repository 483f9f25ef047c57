"""A flow run whose runner died is found by its missing heartbeats and re-run in place;
a suspended run, which sends no heartbeats, is never taken for such a zombie, nor is a flow
process that is alive but frozen (SIGSTOPped), whose runner still renews its lease.

Runs on a runner, Celery worker and beat of this module's own (heartbeats every 30 s, Prefect's
minimum; a zombie after 45 s without one), on the session's Redis, Prefect server, PostgreSQL
and Slurm.
"""

from contextlib import contextmanager
from datetime import timedelta

import psycopg
import pytest
from django.utils import timezone
from prefect.client.orchestration import get_client

from devstack.processes import wait_until
from devstack.stack import Stack
from emg.models import AnalysisRequest, ClusterJob, FlowRunLease, JobWait, ReconcileTick
from tests.e2e.chaos import freeze_for, parent_pid
from tests.e2e.requests import (
    assert_each_job_ran_once_in_slurm,
    final_request,
    jobs_of,
    new_request,
    state_names,
    suspended_on_pending_assembly,
)
from tests.services import database_url
from tests.slurm import cluster_blocked

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

HEARTBEAT_SECONDS = 30
ZOMBIE_AFTER_SECONDS = 45
SLOW_STUDY = "PRJEB40408"  # the fake ENA answers it after 15 s: a long Running window


@pytest.fixture(scope="module")
def zombie_stack(stack, service_logs):
    env = {
        **stack.env,
        "EMG_FLOW_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS),
        "EMG_ZOMBIE_AFTER_SECONDS": str(ZOMBIE_AFTER_SECONDS),
        # The lease of a new flow process appears within a second: the freeze can land early in its life.
        "EMG_FLOW_LEASE_RENEW_SECONDS": "1",
        # The cap counts every emg-tagged job of this Slurm user, other sessions' (a benchmark's
        # thousands of held jobs) included: it must not stop this module's submissions.
        "EMG_MAX_ACTIVE_JOBS": "1000000",
    }
    own = Stack(env, service_logs, label="resilience")
    with stack.paused():
        own.start()
        try:
            yield own
        finally:
            own.stop()


def flow_state(flow_run_id):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def flow_run_of(request: AnalysisRequest):
    def dispatched():
        request.refresh_from_db()
        return request.flow_run_id

    return wait_until(dispatched, timeout=60, message=f"request #{request.id} has its flow run")


# Any number no other session takes: the freeze below holds it, the trigger it installs waits for it.
WAITING_FREEZE_LOCK = 40_408


@contextmanager
def waiting_status_frozen(request: AnalysisRequest):
    """While this holds, marking `request` WAITING blocks (a trigger waits for an advisory lock we hold).

    A flow marks its request WAITING after its step's job and wait are declared and committed
    (together, in one transaction) and before it suspends: it hangs there, Running, with a job to
    re-attach to. Once let go, the blocked UPDATE completes, even if its process is dead meanwhile."""
    table = AnalysisRequest._meta.db_table
    with psycopg.connect(database_url(), autocommit=True) as connection:
        connection.execute("SELECT pg_advisory_lock(%s)", [WAITING_FREEZE_LOCK])
        connection.execute(
            "CREATE FUNCTION emg_test_hold_waiting() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM pg_advisory_xact_lock({WAITING_FREEZE_LOCK}); RETURN NEW; END $$"
        )
        connection.execute(
            f'CREATE TRIGGER emg_test_hold_waiting BEFORE UPDATE ON "{table}" FOR EACH ROW '
            f"WHEN (NEW.id = {int(request.id)} AND NEW.status = 'WAITING') EXECUTE FUNCTION emg_test_hold_waiting()"
        )
        try:
            yield
        finally:
            # Unlock first: dropping the trigger waits for the blocked UPDATE, which waits for this lock.
            connection.execute("SELECT pg_advisory_unlock(%s)", [WAITING_FREEZE_LOCK])
            connection.execute(f'DROP TRIGGER emg_test_hold_waiting ON "{table}"')
            connection.execute("DROP FUNCTION emg_test_hold_waiting()")


def blocked_marking_waiting() -> bool:
    with psycopg.connect(database_url(), autocommit=True) as connection:
        return bool(
            connection.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND wait_event = 'advisory' AND query ILIKE %s",
                [f'UPDATE "{AnalysisRequest._meta.db_table}"%'],
            ).fetchone()[0]
        )


def test_runner_killed_while_its_flow_runs_is_found_silent_rerun_in_place_and_reattaches_to_its_job(
    zombie_stack, ena_server
):
    ena_server.reset_counts()
    request = new_request(SLOW_STUDY)
    flow_run_id = flow_run_of(request)
    wait_until(lambda: flow_state(flow_run_id).is_running(), timeout=60, message="the flow runs")

    # While ENA takes its time, freeze the request's WAITING mark: the flow declares its assembly job
    # and its wait, and then hangs, Running, before it can suspend. Kill the whole runner there, then let go.
    with waiting_status_frozen(request):
        wait_until(blocked_marking_waiting, timeout=90, message="the flow hangs marking its request WAITING")
        job = ClusterJob.objects.get(name=f"emg-assembly-{SLOW_STUDY}")
        assert JobWait.objects.filter(flow_run_id=flow_run_id, job=job).exists()
        zombie_stack.runner.kill()
        killed_at = timezone.now()
    fetched = ena_server.request_count(SLOW_STUDY)
    zombie_stack.runner.start()

    # Nothing marks it Crashed: it stays Running, with no process, until the reconciler sees no heartbeat.
    wait_until(
        lambda: AnalysisRequest.objects.get(id=request.id).flow_reruns == 1,
        timeout=ZOMBIE_AFTER_SECONDS + 90,
        interval=0.5,
        message="the reconciler re-ran the silent flow run",
    )
    rerun_at = timezone.now()
    request = final_request(request, zombie_stack, timeout=240)

    assert request.status == AnalysisRequest.Status.COMPLETED, request.status_reason
    assert request.flow_run_id == flow_run_id and request.flow_reruns == 1  # in place, once
    # The flow marks the request COMPLETED as its last step; Prefect's state follows a moment later.
    wait_until(lambda: state_names(flow_run_id)[-1] == "Completed", timeout=30, message="the flow run completed")
    with get_client(sync_client=True) as client:
        states = client.read_flow_run_states(flow_run_id)
    [rerun] = [n for n, state in enumerate(states) if "re-run by the reconciler" in (state.message or "")]
    assert states[rerun - 1].name == "Running"  # a zombie, never marked Crashed
    assert "stopped sending heartbeats" in states[rerun].message
    assert rerun_at - killed_at >= timedelta(seconds=ZOMBIE_AFTER_SECONDS - HEARTBEAT_SECONDS)
    assert states[-1].name == "Completed"
    jobs = jobs_of(request)
    assert jobs["assembly"].id == job.id  # the job declared before the kill, not a second one
    assert set(jobs) == {"assembly", "analysis", "data move"}
    assert_each_job_ran_once_in_slurm(jobs.values())
    assert ena_server.request_count(SLOW_STUDY) == fetched  # the fetches were cached, not asked again


def test_a_run_suspended_for_longer_than_the_zombie_threshold_is_not_rerun(zombie_stack):
    with cluster_blocked():
        request = new_request("PRJEB40001")
        flow_run_of(request)
        suspended_on_pending_assembly(request)
        suspended_at = timezone.now()
        looked_late = ReconcileTick.objects.filter(
            started_at__gte=suspended_at + timedelta(seconds=ZOMBIE_AFTER_SECONDS + 10), finished_at__isnull=False
        )
        wait_until(
            looked_late.exists,
            timeout=ZOMBIE_AFTER_SECONDS + 60,
            interval=1,
            message="a finished tick well past the zombie threshold",
        )

        request.refresh_from_db()
        assert request.flow_reruns == 0
        assert state_names(request.flow_run_id)[-1] == "Suspended"
        ticks = ReconcileTick.objects.filter(started_at__gte=suspended_at, finished_at__isnull=False)
        assert ticks.count() >= 10
        assert [tick.report for tick in ticks if tick.report.get("rerun")] == []

    request = final_request(request, zombie_stack, timeout=240)
    assert request.status == AnalysisRequest.Status.COMPLETED, request.status_reason
    assert request.flow_reruns == 0
    assert_each_job_ran_once_in_slurm(jobs_of(request).values())


def test_a_flow_process_frozen_for_twice_the_zombie_threshold_continues_completes_and_is_not_rerun(zombie_stack):
    """SIGSTOP the flow process (not its runner) early in its life, for twice the zombie threshold:
    it sends no heartbeat all that time, but its runner keeps renewing its lease, so the ticks see a
    silent run whose process still exists (they report it as leased) and leave it; continued, it
    carries on and completes, no re-run counted."""
    request = new_request("PRJEB40001")
    flow_run_id = flow_run_of(request)
    lease = wait_until(
        lambda: FlowRunLease.objects.filter(flow_run_id=flow_run_id).first(),
        timeout=90,
        interval=0.1,
        message="the runner leased the flow run's process",
    )
    assert parent_pid(lease.pid) == zombie_stack.runner.process.pid  # the flow process, a child of the runner
    frozen_at = timezone.now()
    freeze_for([lease.pid], 2 * ZOMBIE_AFTER_SECONDS)
    continued_at = timezone.now()

    # A deadline for a cluster shared with other sessions, whose jobs may hold the node for minutes.
    request = final_request(request, zombie_stack, timeout=480)
    assert request.status == AnalysisRequest.Status.COMPLETED, request.status_reason
    assert request.flow_reruns == 0
    ticks = ReconcileTick.objects.filter(
        started_at__gte=frozen_at, started_at__lte=continued_at, finished_at__isnull=False
    )
    # Some tick during the freeze took the silent run for a suspect and kept it for its lease.
    assert any(str(flow_run_id) in tick.report.get("leased", []) for tick in ticks), [t.report for t in ticks]
    assert not [tick.report for tick in ticks if tick.report.get("rerun")]
    with get_client(sync_client=True) as client:
        states = client.read_flow_run_states(flow_run_id)
    assert not [state for state in states if "re-run by the reconciler" in (state.message or "")]
    assert_each_job_ran_once_in_slurm(jobs_of(request).values())


@pytest.mark.soak
def test_a_flow_process_frozen_with_its_runner_is_rerun_once_and_the_old_process_ends_quietly(zombie_stack):
    """SIGSTOP the runner and its flow process together (a paused host) for twice the zombie
    threshold: no heartbeat and no lease renewal, so the reconciler re-runs the run, once. Continued,
    the old process finds at its next step that a re-run was counted since it started and exits
    without a word (exit status 0: neither it nor its runner marks the run Failed or Crashed); the
    runner then starts the re-run, which completes the request. One re-run, no failed state."""
    request = new_request("PRJEB40002")
    flow_run_id = flow_run_of(request)
    lease = wait_until(
        lambda: FlowRunLease.objects.filter(flow_run_id=flow_run_id).first(),
        timeout=90,
        interval=0.1,
        message="the runner leased the flow run's process",
    )
    runner_pid = zombie_stack.runner.process.pid
    assert parent_pid(lease.pid) == runner_pid
    freeze_for([runner_pid, lease.pid], 2 * ZOMBIE_AFTER_SECONDS)
    request.refresh_from_db()
    assert request.flow_reruns == 1  # re-run while frozen: nothing vouched for it

    request = final_request(request, zombie_stack, timeout=480)
    assert request.status == AnalysisRequest.Status.COMPLETED, request.status_reason
    assert request.flow_reruns == 1
    wait_until(lambda: state_names(flow_run_id)[-1] == "Completed", timeout=30, message="the flow run completed")
    names = state_names(flow_run_id)
    assert not {"Crashed", "Failed"} & set(names), names
    quiet = "leaves the run to its new process" in zombie_stack.runner.log_path.read_text(errors="replace")
    print(f"states: {names}; the old process stopped at its fence: {quiet}")
    assert_each_job_ran_once_in_slurm(jobs_of(request).values())
