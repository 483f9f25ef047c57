"""Reconciliation keeps its pace whatever backlog dispatch has: the tick has a queue and a worker of its own.

Runs on a Redis, a dispatch worker, a tick worker and a beat of this module's own (devstack), on the
session's PostgreSQL, Prefect server and the real Slurm cluster. The dispatch worker's Prefect is a
socket that accepts connections and never answers (a hung or partitioned Prefect server): each
event it takes holds one of its two pool slots until Prefect's request timeout, so the events saved
meanwhile pile up in its queue.
"""

import os
import re
import socket
import subprocess
import sys
from itertools import pairwise
from types import SimpleNamespace

import psycopg
import pytest
import redis
from django.conf import settings
from django.utils import timezone

from devstack.processes import ROOT, ManagedProcess, wait_until
from devstack.services import free_port, start_redis
from devstack.stack import celery_beat, celery_worker, worker_answers
from emg.models import AnalysisRequest, ClusterJob, ClusterJobState, OutboxEvent, ReconcileTick, Study
from flows.cluster_jobs import declare_job
from tests.services import broker_at
from tests.workers.ticking import shell_job
from workers.celery import UNACKED_KEY

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


def start_workers_and_beat(
    processes: list[ManagedProcess],
    label: str,
    env: dict[str, str],
    log_dir,
    dispatch_env: dict[str, str] | None = None,
) -> None:
    """A dispatch worker (with `dispatch_env` on top), a tick worker and a beat on `env`'s broker,
    appended to `processes` as they start, so the caller stops whatever did."""
    node = f"{label}-{os.getpid()}"
    processes.append(
        celery_worker(
            f"{label}-celery-worker", node, {**env, **(dispatch_env or {})}, log_dir, roles="dispatch"
        ).start()
    )
    processes.append(
        celery_worker(
            f"{label}-celery-tick-worker", f"{node}-tick", env, log_dir, roles="reconcile", concurrency=1
        ).start()
    )
    for name in (node, f"{node}-tick"):
        wait_until(
            lambda name=name: worker_answers(env, name), timeout=60, message=f"Celery worker {name} answers pings"
        )
    processes.append(celery_beat(f"{label}-celery-beat", env, log_dir, log_dir / f"{label}-beat.schedule").start())


@pytest.fixture
def flooded_stack(stack, service_logs, hung_prefect):
    """Our Redis, a dispatch worker talking to the hung Prefect, a tick worker and a beat talking to the real one."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    env = {**stack.env, "REDIS_URL": url, "CELERY_BROKER_URL": url}
    processes: list[ManagedProcess] = []
    with stack.paused(), broker_at(url, REDIS_URL=url):
        try:
            processes.append(start_redis(port, service_logs, env, "flood-redis"))
            start_workers_and_beat(
                processes,
                "flood",
                env,
                service_logs,
                dispatch_env={"PREFECT_API_URL": hung_prefect, "PREFECT_API_REQUEST_TIMEOUT": "600"},
            )
            yield redis.Redis.from_url(url)
        finally:
            for process in reversed(processes):
                process.stop()


def test_ticks_keep_their_interval_and_track_slurm_work_while_dispatch_is_flooded(
    flooded_stack, work_dir, cancel_left_jobs
):
    study, _ = Study.objects.get_or_create(accession="PRJEB40001")
    requests = [AnalysisRequest.objects.create(study=study) for _ in range(BACKLOG)]
    wait_until(
        lambda: flooded_stack.llen(settings.EMG_DISPATCH_QUEUE) >= BACKLOG - 10,
        timeout=60,
        message="the saves' events wait in the dispatch queue",
    )
    since = timezone.now()
    job = declare_job(shell_job("flooded-dispatch", "sleep 2; echo tracked", work_dir))

    finished = ReconcileTick.objects.filter(started_at__gte=since, finished_at__isnull=False).order_by("started_at")
    wait_until(
        lambda: finished.count() >= TICKS and ClusterJob.objects.get(id=job.id).is_final,
        timeout=TICKS * MAX_GAP_SECONDS,
        interval=0.5,
        message=f"{TICKS} ticks and the declared job tracked to its end",
    )

    starts = [tick.started_at for tick in finished]
    gaps = [(later - earlier).total_seconds() for earlier, later in pairwise(starts)]
    assert max(gaps) <= MAX_GAP_SECONDS, gaps
    job.refresh_from_db()
    assert (job.state, job.attempts) == (ClusterJobState.COMPLETED, 1)
    # The backlog was there the whole time: not one event reached Prefect, nearly all still queued.
    assert not OutboxEvent.objects.of(*requests).filter(dispatched_at__isnull=False).exists()
    assert flooded_stack.llen(settings.EMG_DISPATCH_QUEUE) >= BACKLOG - 10
    assert flooded_stack.llen(settings.EMG_RECONCILE_QUEUE) <= 1


@pytest.fixture
def second_instance(stack, service_logs):
    """Another instance on the same Redis as ours: its own database (and so, by default, its own
    namespace), with a dispatch worker, a tick worker and a beat. Ours publishes; no worker of ours runs."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    database = settings.DATABASES["default"]
    other_name = f"{database['NAME']}_other"
    admin = psycopg.connect(
        f"postgresql://{database['USER']}@{database['HOST']}:{database['PORT']}/postgres", autocommit=True
    )
    admin.execute(f'CREATE DATABASE "{other_name}"')
    env = {name: value for name, value in stack.env.items() if name != "EMG_INSTANCE_NAMESPACE"}
    env.update(
        REDIS_URL=url,
        CELERY_BROKER_URL=url,
        DATABASE_URL=f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{other_name}",
        # It never reaches our Prefect: nothing of ours may be dispatched by it.
        PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api",
    )
    processes: list[ManagedProcess] = []
    with stack.paused(), broker_at(url, REDIS_URL=url):
        try:
            processes.append(start_redis(port, service_logs, env, "two-instances-redis"))
            migrate = subprocess.run(
                [sys.executable, "manage.py", "migrate", "--no-input"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert migrate.returncode == 0, migrate.stderr[-2000:]
            start_workers_and_beat(processes, "other-instance", env, service_logs)
            yield SimpleNamespace(redis=redis.Redis.from_url(url), database=other_name, env=env)
        finally:
            for process in reversed(processes):
                process.stop()
            admin.execute(f'DROP DATABASE IF EXISTS "{other_name}" WITH (FORCE)')
            admin.close()


def ticks_in(database: str) -> int:
    settings_of_ours = settings.DATABASES["default"]
    with psycopg.connect(
        f"postgresql://{settings_of_ours['USER']}@{settings_of_ours['HOST']}:{settings_of_ours['PORT']}/{database}"
    ) as connection:
        return connection.execute("SELECT count(*) FROM emg_reconciletick WHERE finished_at IS NOT NULL").fetchone()[0]


def test_two_instances_on_one_redis_never_take_each_others_tasks(second_instance):
    saved = [
        AnalysisRequest.objects.create(study=Study.objects.get_or_create(accession="PRJEB40002")[0]) for _ in range(5)
    ]
    client = second_instance.redis
    wait_until(
        lambda: client.llen(settings.EMG_DISPATCH_QUEUE) == len(saved),
        timeout=30,
        message="our events wait in our dispatch queue",
    )
    # The other instance ticks and sweeps all the while, on queues, a lock and a schedule of its own.
    ticked_before = ticks_in(second_instance.database)
    wait_until(
        lambda: ticks_in(second_instance.database) >= ticked_before + 5,
        timeout=60,
        message="the other instance's beat and tick worker run",
    )

    assert client.llen(settings.EMG_DISPATCH_QUEUE) == len(saved)
    assert client.hlen(UNACKED_KEY) == 0  # none of ours was delivered to a worker
    assert not OutboxEvent.objects.of(*saved).filter(dispatched_at__isnull=False).exists()
    assert not ReconcileTick.objects.filter(started_at__gte=saved[0].created_at).exists()  # its ticks are its own
    # Its namespace came from its database's name; its schedule and lock live under it.
    other = re.sub(r"[^a-z0-9]+", "-", second_instance.database.lower()).strip("-")
    assert other != settings.EMG_INSTANCE_NAMESPACE
    assert client.keys(f"emg:{other}:redbeat*")
    assert not client.keys(f"emg:{settings.EMG_INSTANCE_NAMESPACE}:redbeat*")
