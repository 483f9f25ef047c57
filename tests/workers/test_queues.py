"""Reconciliation keeps its pace whatever backlog dispatch has: the tick has a queue and a worker of its own.

Runs on a Redis, a dispatch worker, a tick worker and a beat of this module's own (devstack), on the
session's PostgreSQL, Prefect server and the real Slurm cluster. The dispatch worker's Prefect is a
socket that accepts connections and never answers (a hung or partitioned Prefect server): each
event it takes holds one of its two pool slots until Prefect's request timeout, so the events saved
meanwhile pile up in its queue.
"""

import os
import socket
from itertools import pairwise

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from devstack.processes import ManagedProcess, wait_until
from devstack.services import free_port, start_redis
from devstack.stack import celery_beat, celery_worker, worker_answers
from emg.models import AnalysisRequest, ClusterJob, ClusterJobState, OutboxEvent, ReconcileTick, Study
from flows.cluster_jobs import declare_job
from tests.services import broker_at
from tests.workers.ticking import shell_job

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.django_db(transaction=True)]

BACKLOG = 300
TICKS = 15
# beat sends a tick every EMG_RECONCILE_INTERVAL_SECONDS (1 s in the tests); on a loaded two-core
# machine one may start a few seconds late, never a whole backlog late.
MAX_GAP_SECONDS = 5


@pytest.fixture
def hung_prefect():
    """A TCP port that accepts connections (into its backlog) and never answers a request."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/api"


@pytest.fixture
def flooded_stack(stack, service_logs, hung_prefect):
    """Our Redis, a dispatch worker talking to the hung Prefect, a tick worker and a beat talking to the real one."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    env = {**stack.env, "REDIS_URL": url, "CELERY_BROKER_URL": url}
    node = f"flood-{os.getpid()}"
    processes: list[ManagedProcess] = []
    with stack.paused(), broker_at(url, REDIS_URL=url):
        try:
            processes.append(start_redis(port, service_logs, env, "flood-redis"))
            processes.append(celery_worker(
                "flood-celery-worker", node, {**env, "PREFECT_API_URL": hung_prefect,
                                              "PREFECT_API_REQUEST_TIMEOUT": "600"},
                service_logs, roles="dispatch").start())
            processes.append(celery_worker("flood-celery-tick-worker", f"{node}-tick", env, service_logs,
                                           roles="reconcile", concurrency=1).start())
            for name in (node, f"{node}-tick"):
                wait_until(lambda name=name: worker_answers(env, name), timeout=60,
                           message=f"Celery worker {name} answers pings")
            processes.append(celery_beat("flood-celery-beat", env, service_logs,
                                         service_logs / "flood-beat.schedule").start())
            yield redis.Redis.from_url(url)
        finally:
            for process in reversed(processes):
                process.stop()


def test_ticks_keep_their_interval_and_track_slurm_work_while_dispatch_is_flooded(
    flooded_stack, work_dir, cancel_left_jobs
):
    study, _ = Study.objects.get_or_create(accession="PRJEB40001")
    requests = [AnalysisRequest.objects.create(study=study) for _ in range(BACKLOG)]
    wait_until(lambda: flooded_stack.llen(settings.EMG_DISPATCH_QUEUE) >= BACKLOG - 10, timeout=60,
               message="the saves' events wait in the dispatch queue")
    since = timezone.now()
    job = declare_job(shell_job("flooded-dispatch", "sleep 2; echo tracked", work_dir))

    finished = ReconcileTick.objects.filter(started_at__gte=since, finished_at__isnull=False).order_by("started_at")
    wait_until(lambda: finished.count() >= TICKS and ClusterJob.objects.get(id=job.id).is_final,
               timeout=TICKS * MAX_GAP_SECONDS, interval=0.5,
               message=f"{TICKS} ticks and the declared job tracked to its end")

    starts = [tick.started_at for tick in finished]
    gaps = [(later - earlier).total_seconds() for earlier, later in pairwise(starts)]
    assert max(gaps) <= MAX_GAP_SECONDS, gaps
    job.refresh_from_db()
    assert (job.state, job.attempts) == (ClusterJobState.COMPLETED, 1)
    # The backlog was there the whole time: not one event reached Prefect, nearly all still queued.
    assert not OutboxEvent.objects.filter(request__in=requests, dispatched_at__isnull=False).exists()
    assert flooded_stack.llen(settings.EMG_DISPATCH_QUEUE) >= BACKLOG - 10
    assert flooded_stack.llen(settings.EMG_RECONCILE_QUEUE) <= 1
