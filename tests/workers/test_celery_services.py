"""Each saved request gets exactly one flow run, whatever happens to Redis and Celery on the
way, and beat ticks never overlap.

Runs on a Redis, Celery dispatch and tick workers and a beat of this module's own
(`own_redis_stack`), which the tests stop and kill; the session's Prefect server and runner,
PostgreSQL and Slurm are real.
"""

import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from itertools import pairwise

import psycopg
import pytest
from django.utils import timezone
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

from devstack.processes import ROOT, wait_until
from emg.models import (
    AnalysisRequest,
    ClusterJob,
    ClusterJobState,
    OutboxEvent,
    ReconcileTick,
)
from emg.outbox import publish
from flows.cluster_jobs import declare_job
from tests.e2e.requests import final_request, new_request
from tests.services import broker_unreachable, database_url
from tests.slurm import slurm_jobs_tagged
from tests.workers.ticking import shell_job

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.django_db(transaction=True)]


def flow_runs_of(prefect, request: AnalysisRequest) -> list:
    """Every flow run Prefect holds for the request (the consumer tags each with the request id)."""
    return prefect.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"request-{request.id}"])))


def ran_once(prefect, request: AnalysisRequest, stack) -> None:
    """The request's flow run ran to its end, and it is the only one the request ever had.

    How the flow ends is not the point here (these studies are unknown to the fake ENA, so it
    fails fast, with no cluster job): that it started exactly once is.
    """
    request = final_request(request, stack, timeout=120)
    assert request.flow_run_id is not None, request.status_reason
    assert [run.id for run in flow_runs_of(prefect, request)] == [request.flow_run_id]
    assert OutboxEvent.objects.of(request).get().dispatched_at is not None


@contextmanager
def row_locked(request: AnalysisRequest):
    """Hold the request's row lock, so whoever updates the request waits until we let go."""
    with psycopg.connect(database_url()) as connection:
        connection.execute(f"SELECT 1 FROM {AnalysisRequest._meta.db_table} WHERE id = %s FOR UPDATE", [request.id])
        yield
        connection.rollback()


def tasks_received(log_text: str) -> list[str]:
    return re.findall(r"Task emg\.dispatch_event\[([0-9a-f-]+)\] received", log_text)


def test_requests_saved_while_redis_is_down_each_get_exactly_one_flow_run_once_it_is_back(
    own_redis_stack, stack, prefect
):
    own_redis_stack.stop_redis()
    requests = [new_request(f"PRJEB3000{n}") for n in range(5)]
    events = OutboxEvent.objects.of(*requests)
    assert events.count() == 5 and not events.filter(published_at__isnull=False).exists()

    own_redis_stack.start_redis()

    for request in requests:
        ran_once(prefect, request, stack)


def test_the_same_event_delivered_ten_times_starts_one_flow_run(own_redis_stack, stack, prefect):
    request = new_request("PRJEB30010")  # the first delivery, after commit
    event = OutboxEvent.objects.of(request).get()
    for _ in range(9):
        assert publish(event.id)

    # Two worker processes take them two at a time: some deliveries race the first one.
    wait_until(lambda: own_redis_stack.queued_or_unacked() == 0, timeout=60, message="all ten deliveries done")
    ran_once(prefect, request, stack)


def test_celery_worker_killed_while_dispatching_has_the_event_redelivered_and_still_one_flow_run(
    own_redis_stack, stack, prefect
):
    with broker_unreachable():
        request = new_request("PRJEB30020")
    event = OutboxEvent.objects.of(request).get()
    [worker] = [process for process in own_redis_stack.workers if process.running]

    with row_locked(request):
        assert publish(event.id)
        # The consumer has made the flow run and now waits for our lock to record it: kill it there.
        wait_until(lambda: flow_runs_of(prefect, request), timeout=60, message="the consumer created the flow run")
        [task_id] = tasks_received(worker.log_path.read_text())[-1:]
        worker.kill()
    replacement = own_redis_stack.start_worker()

    # The very message comes back (after the visibility timeout); the outbox sweep may publish
    # the event again sooner: either way, one flow run.
    wait_until(
        lambda: task_id in tasks_received(replacement.log_path.read_text()),
        timeout=60,
        message=f"task {task_id} redelivered to the new worker",
    )
    wait_until(lambda: own_redis_stack.queued_or_unacked() == 0, timeout=60, message="every delivery done")
    ran_once(prefect, request, stack)


def test_two_beat_processes_never_run_overlapping_ticks_and_submit_each_job_once(own_redis_stack, work_dir):
    second_beat = own_redis_stack.start_beat()
    since = timezone.now()
    jobs = [declare_job(shell_job(f"two-beats-{n}", f"sleep 2; echo {n}", work_dir)) for n in range(5)]
    ticks = ReconcileTick.objects.filter(started_at__gte=since, finished_at__isnull=False).order_by("started_at")

    # Ten one-second intervals at least, and every job through to its end.
    wait_until(
        lambda: ticks.count() >= 10 and all(ClusterJob.objects.get(id=job.id).is_final for job in jobs),
        timeout=120,
        interval=0.5,
        message="ten ticks and all five jobs ended",
    )

    assert all(beat.running for beat in own_redis_stack.beats)
    recorded = list(ticks)
    overlaps = [(a.id, b.id) for a, b in pairwise(recorded) if b.started_at < a.finished_at]
    assert overlaps == []
    for job in jobs:
        job.refresh_from_db()
        assert (job.state, job.attempts) == (ClusterJobState.COMPLETED, 1)
        assert slurm_jobs_tagged(job.tag, including=[job.slurm_job_id]) == [job.slurm_job_id]
    second_beat.stop()


def beat_health(env: dict[str, str], slack: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "beat_health", "--slack", str(slack)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_beat_health_passes_while_beat_sends_and_fails_once_beat_is_frozen(own_redis_stack):
    """The beat container's healthcheck reads when RedBeat last sent each task: a beat process that
    still exists but sends nothing (here SIGSTOPped) is reported late, naming the tick."""
    env = own_redis_stack.env
    healthy = wait_until(
        lambda: (result := beat_health(env, slack=0)).returncode == 0 and result,
        timeout=30,
        interval=1,
        message="beat_health passes while beat sends",
    )
    assert "reconcile-cluster-jobs: last sent" in healthy.stdout

    # The module's beat (another test may have started and stopped a second one meanwhile).
    beat = next(beat for beat in own_redis_stack.beats if beat.running)
    beat.kill(signal.SIGSTOP)
    try:
        late = wait_until(
            lambda: (result := beat_health(env, slack=0)).returncode != 0 and result,
            timeout=60,
            interval=1,
            message="beat_health fails while beat is frozen",
        )
    finally:
        beat.kill(signal.SIGCONT)
    assert "beat is late" in late.stderr and "reconcile-cluster-jobs" in late.stderr
