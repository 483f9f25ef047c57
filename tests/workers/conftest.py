"""Fixtures for the reconciler tests: real PostgreSQL, Slurm and Prefect, with ticks the test drives.

A test here calls `Reconciler.tick()` itself, with limits of its own choosing, while it holds the
beat's tick lock: a session stack started by other tests then skips its ticks instead of
racing ours (see workers.reconcile.lock).
"""

import getpass
import os
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from django.conf import settings
from prefect.client.orchestration import get_client

from devstack.processes import ManagedProcess, wait_until
from devstack.services import free_port, start_redis
from devstack.stack import celery_beat, celery_worker, worker_answers
from emg.models import ClusterJob
from slurm_adapter import Cluster, RestCluster, SlurmCluster
from tests.services import broker_at
from tests.slurm import SLURMRESTD_URL, test_cluster_backend, write_token_file
from tests.workers.ticking import held_tick_lock
from workers.celery import UNACKED_KEY
from workers.reconciler import Reconciler

# Generous unless a test is about one of them: the test, not a limit, decides what happens.
DEFAULT_LIMITS = dict(
    max_active_jobs=100,
    max_submissions_per_minute=1000,
    resumes_per_tick=100,
    zombie_after=timedelta(hours=1),
    max_flow_reruns=3,
)


@pytest.fixture
def prefect(prefect_api_url):
    with get_client(sync_client=True) as client:
        yield client


@pytest.fixture(scope="session")
def cluster(slurm_cluster, tmp_path_factory) -> Cluster:
    """The real cluster through the backend EMG_TEST_CLUSTER_BACKEND names (Slurm's commands by default)."""
    if test_cluster_backend() == "slurmrestd":
        return RestCluster(
            url=SLURMRESTD_URL,
            user=getpass.getuser(),
            token_file=str(write_token_file(tmp_path_factory.mktemp("slurmrestd"))),
            accounting_grace_s=settings.EMG_SLURM_ACCOUNTING_GRACE_SECONDS,
        )
    return SlurmCluster(accounting_grace_s=settings.EMG_SLURM_ACCOUNTING_GRACE_SECONDS)


@pytest.fixture
def reconcile_lock(transactional_db):
    """The beat's tick lock, held for the whole test, so ours are the only ticks."""
    with held_tick_lock() as lock:
        yield lock


@pytest.fixture
def cancel_left_jobs(transactional_db, cluster):
    """A failing test must not leave its jobs sleeping on the cluster."""
    yield
    for job_id in ClusterJob.objects.live().exclude(slurm_job_id="").values_list("slurm_job_id", flat=True):
        cluster.cancel(job_id)


@pytest.fixture
def make_reconciler(cluster, prefect, reconcile_lock, cancel_left_jobs):
    def make(**limits) -> Reconciler:
        return Reconciler(cluster, prefect, **{**DEFAULT_LIMITS, **limits})

    return make


@pytest.fixture
def work_dir() -> Path:
    """A work dir of this test's own under EMG_WORK_DIR: its jobs' fingerprints and tags are unique."""
    path = Path(settings.EMG_WORK_DIR) / "tests" / uuid.uuid4().hex[:12]
    path.mkdir(parents=True)
    return path


class OwnRedisStack:
    """A Redis of this module's own, with Celery workers (dispatch, and a tick worker) and beat on
    it: services a test may kill.

    The session stack's Prefect runner is shared (it uses no Redis); the session stack's workers
    and beat are paused meanwhile, so that no other consumer or sweep reaches our database.
    """

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.env = {**env, "REDIS_URL": self.url}
        self.log_dir = log_dir
        self.redis: ManagedProcess | None = None
        self.workers: list[ManagedProcess] = []  # dispatch workers
        self.tick_worker: ManagedProcess | None = None
        self.beats: list[ManagedProcess] = []

    def start_redis(self) -> None:
        self.redis = start_redis(self.port, self.log_dir, self.env, "redis-own")

    def stop_redis(self) -> None:
        assert self.redis is not None
        self.redis.stop()

    def _worker(self, name: str, roles: str, concurrency: int, **env: str) -> ManagedProcess:
        worker = celery_worker(
            f"celery-worker-{name}", name, {**self.env, **env}, self.log_dir, roles=roles, concurrency=concurrency
        ).start()
        wait_until(lambda: worker_answers(self.env, name), timeout=60, message=f"Celery worker {name} answers pings")
        return worker

    def start_worker(self, **env: str) -> ManagedProcess:
        worker = self._worker(f"own-{os.getpid()}-{len(self.workers)}", "dispatch", 2, **env)
        self.workers.append(worker)
        return worker

    def start_tick_worker(self) -> ManagedProcess:
        self.tick_worker = self._worker(f"own-{os.getpid()}-tick", "reconcile", 1)
        return self.tick_worker

    def start_beat(self) -> ManagedProcess:
        name = f"celery-beat-own-{os.getpid()}-{len(self.beats)}"
        beat = celery_beat(name, self.env, self.log_dir, self.log_dir / f"{name}.schedule").start()
        self.beats.append(beat)
        return beat

    def queued_or_unacked(self) -> int:
        """Dispatch messages the broker still holds: waiting in the queue, or delivered and not yet acknowledged."""
        client = redis.Redis.from_url(self.url)
        return client.llen(settings.EMG_DISPATCH_QUEUE) + client.hlen(UNACKED_KEY)

    def stop(self) -> None:
        for process in [*self.beats, self.tick_worker, *self.workers, self.redis]:
            if process is not None:
                process.stop()


@pytest.fixture(scope="module")
def own_redis_stack(stack, service_logs):
    own = OwnRedisStack(
        {
            **stack.env,
            # A killed worker's unacknowledged task comes back after this (and a restore sweep): seconds, not minutes.
            "EMG_CELERY_VISIBILITY_TIMEOUT": "10",
            "EMG_MAX_SUBMISSIONS_PER_MINUTE": "600",
        },
        service_logs,
    )
    with stack.paused(keep_runner=True), broker_at(own.url, REDIS_URL=own.url):
        # The test process publishes too (emg.outbox): to our Redis, through a producer made for it.
        try:
            own.start_redis()
            own.start_worker()
            own.start_tick_worker()
            own.start_beat()
            yield own
        finally:
            own.stop()
