"""A Prefect outage with a backlog of events: dispatch retries are bounded, the outbox sweep never
publishes an event whose task is still in the broker, and once Prefect is back each request gets
exactly one flow run.

On the `own_redis_stack` (a Redis, Celery worker and beat of this module's own); the consumer is
pointed at a Prefect API nobody serves, which is what a stopped Prefect server looks like to it.
"""

import json
import os
import threading
from itertools import pairwise

import pytest
import redis
from django.conf import settings
from django.utils import timezone
from prefect.exceptions import ObjectNotFound

from devstack.processes import wait_until
from devstack.services import free_port
from emg.models import AnalysisRequest, OutboxEvent, ReconcileTick
from emg.outbox import DISPATCH_TASK_NAME
from tests.e2e.requests import new_request
from tests.workers.test_celery_services import flow_runs_of
from workers.celery import UNACKED_KEY

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.django_db(transaction=True)]

EVENTS = int(os.environ.get("EMG_TEST_BACKLOG_EVENTS", "40"))
WORKER_PROCESSES = 2  # the own stack's worker concurrency
# Long enough for events' retries (3 here: 2 + 4 + 8 s) to run out and the sweep (every 2 s, 5 s
# grace) to take over several times.
OUTAGE_SECONDS = float(os.environ.get("EMG_TEST_BACKLOG_OUTAGE_SECONDS", "60"))
# Backlogs up to this size (CI's) run out of retries within a minute or two of the outage, and the
# test waits for the sweep to take every event over; larger ones are still retrying when it ends.
SWEEP_TAKES_ALL_OVER_UP_TO = 100
# Ticks every EMG_RECONCILE_INTERVAL_SECONDS (1 s in tests); a loaded machine may hold one back a while.
MAX_TICK_GAP_SECONDS = 10


def dispatch_tasks_in(client: redis.Redis) -> int:
    """Dispatch tasks the broker holds: queued, or delivered and not acknowledged (which is where
    the Redis transport keeps a task waiting on its retry countdown). Ticks and sweeps not counted."""
    queued = [json.loads(raw) for raw in client.lrange(settings.EMG_DISPATCH_QUEUE, 0, -1)]
    unacked = [json.loads(raw)[0] for raw in client.hvals(UNACKED_KEY)]
    return sum(1 for message in queued + unacked if message["headers"].get("task") == DISPATCH_TASK_NAME)


class BrokerSampler:
    """The most dispatch tasks the broker held at once, sampled in a thread."""

    def __init__(self, stack):
        self.client = redis.Redis.from_url(stack.url)
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.samples.append(dispatch_tasks_in(self.client))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture
def runs_never_run(stack, prefect):
    """The session runner is stopped while this test makes its flow runs (thousands at full size:
    their flow processes would load the machine long after the test), and the runs it made are
    deleted before the runner starts again. Yields the list to add the test's requests to."""
    requests: list[AnalysisRequest] = []
    stack.runner.stop()
    try:
        yield requests
    finally:
        for request in requests:
            for run in flow_runs_of(prefect, request):
                try:
                    prefect.delete_flow_run(run.id)
                except ObjectNotFound:
                    pass
        stack.runner.start()
        wait_until(stack.deployment_served, timeout=120, interval=0.5, message="the runner serves again")


def test_a_prefect_outage_with_a_backlog_never_grows_the_queue_and_ends_in_one_flow_run_each(
    own_redis_stack, prefect, runs_never_run
):
    for worker in own_redis_stack.workers:
        worker.stop()
    dead_prefect = f"http://127.0.0.1:{free_port()}/api"
    outage_worker = own_redis_stack.start_worker(PREFECT_API_URL=dead_prefect, EMG_DISPATCH_MAX_RETRIES="3")

    with BrokerSampler(own_redis_stack) as sampler:
        requests = [new_request(f"PRJEB3{n:04d}") for n in range(100, 100 + EVENTS)]
        runs_never_run.extend(requests)
        events = OutboxEvent.objects.of(*requests)
        outage_started = timezone.now()

        # How many events run out of retries within the outage, and are taken over by the sweep,
        # depends on how fast the consumer fails, not on the outage: each attempt against a dead API
        # costs the Prefect client's own retries (about 1.6 s here) and a retry waits behind the
        # queue, so at 2,000 events none is through its retries after 10 minutes. What must hold
        # at any size is below the outage: the broker never held more tasks than events.
        if EVENTS <= SWEEP_TAKES_ALL_OVER_UP_TO:
            wait_until(
                lambda: (
                    events.filter(last_error__startswith="dispatch failed").count() == EVENTS
                    and sum(events.values_list("publish_attempts", flat=True)) > EVENTS
                ),
                timeout=OUTAGE_SECONDS + 120,
                interval=1,
                message="every event's dispatch retries ran out and the sweep published them again",
            )
        wait_until(
            lambda: (timezone.now() - outage_started).total_seconds() >= OUTAGE_SECONDS,
            timeout=OUTAGE_SECONDS + 30,
            interval=1,
            message="the outage lasted",
        )
        outage_ended = timezone.now()
        given_back = events.filter(last_error__startswith="dispatch failed").count()
        published = sum(events.values_list("publish_attempts", flat=True))
        outage_worker.stop()

    # The reconciler has a queue and a worker of its own: the outage and its backlog did not hold
    # a tick back.
    ticks = ReconcileTick.objects.filter(started_at__gte=outage_started, started_at__lte=outage_ended)
    starts = list(ticks.order_by("started_at").values_list("started_at", flat=True))
    gaps = [(later - earlier).total_seconds() for earlier, later in pairwise([outage_started, *starts, outage_ended])]
    assert max(gaps) <= MAX_TICK_GAP_SECONDS, (len(starts), max(gaps))
    print(
        f"\n{EVENTS} events, {OUTAGE_SECONDS:.0f} s outage: {given_back} given back to the sweep, "
        f"{published - EVENTS} published again, "
        f"at most {max(sampler.samples)} dispatch tasks in the broker, {len(starts)} ticks, "
        f"longest gap between ticks {max(gaps):.1f} s"
    )
    assert not events.filter(dispatched_at__isnull=False).exists()
    # A retry is published before the task it replaces is acknowledged: for that instant one event
    # has two, at most one per worker process (2). Without the in-flight record every sweep added one per event.
    assert max(sampler.samples) <= EVENTS + WORKER_PROCESSES, max(sampler.samples)

    own_redis_stack.start_worker()
    for request in requests:
        wait_until(
            lambda request=request: OutboxEvent.objects.of(request).get().dispatched_at,
            timeout=180,
            interval=0.5,
            message=f"request #{request.id} dispatched once Prefect answers",
        )
    for request in requests:
        request.refresh_from_db()
        assert [run.id for run in flow_runs_of(prefect, request)] == [request.flow_run_id]
