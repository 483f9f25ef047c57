"""Driving reconciler ticks from a test, and watching what they do."""

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings

from devstack.processes import wait_until
from emg.models import ClusterJob
from emg.policies import ResubmitPolicy
from flows.cluster_jobs import declare_job
from slurm_adapter import JobSpec
from tests.slurm import active_jobs_of
from workers.reconcile.lock import TickLock
from workers.reconciler import Reconciler, TickReport


@contextmanager
def held_tick_lock(timeout: float = 120) -> Iterator[TickLock]:
    """The beat's tick lock, held by this test process: a running stack's ticks skip meanwhile."""
    lock = TickLock()
    assert lock.acquire(timeout=timeout), f"another reconcile tick held the lock for {timeout} s"
    try:
        yield lock
    finally:
        lock.release()


def shell_job(name: str, script: str, work_dir: Path, **resources) -> JobSpec:
    """A small bash job; 100 MB unless told otherwise, so dozens fit on the node beside other sessions' jobs."""
    resources.setdefault("memory_mb", 100)
    resources.setdefault("time_limit_minutes", 5)
    return JobSpec(
        name=name,
        command=("bash", "-c", script),
        work_dir=str(work_dir),
        partition=settings.EMG_SLURM_PARTITION,
        **resources,
    )


def tick_until(
    reconciler: Reconciler, done: Callable[[], object], *, timeout: float = 90, interval: float = 0.5, message: str = ""
) -> list[TickReport]:
    """Tick until `done()` holds; every tick's report, which must carry no error."""
    reports: list[TickReport] = []

    def ticked():
        reports.append(reconciler.tick())
        return done()

    wait_until(ticked, timeout=timeout, interval=interval, message=message or f"{done} after reconcile ticks")
    errors = [error for report in reports for error in report.errors]
    assert not errors, errors
    return reports


def job_ended(job_id: int) -> Callable[[], bool]:
    return lambda: ClusterJob.objects.get(id=job_id).is_final


def run_job(
    reconciler: Reconciler,
    spec: JobSpec,
    policy: ResubmitPolicy = ResubmitPolicy(),
    inputs: Iterable[str] = (),
    timeout: float = 90,
) -> ClusterJob:
    """Declare the job and tick until it has ended: the row as it ended."""
    job = declare_job(spec, inputs, policy)
    tick_until(reconciler, job_ended(job.id), timeout=timeout, message=f"job {spec.name} ended")
    job.refresh_from_db()
    return job


def submitted(reports: Iterable[TickReport]) -> list[str]:
    return [job_id for report in reports for job_id in report.submitted]


class ActiveJobSampler:
    """Counts, in a thread, how many of the given jobs Slurm has PENDING or RUNNING; keeps the highest count."""

    def __init__(self, fingerprints: Iterable[str], interval: float = 0.2):
        self.fingerprints = set(fingerprints)
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(len(active_jobs_of(self.fingerprints)))
            self._stop.wait(self.interval)

    def __enter__(self) -> "ActiveJobSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class RecordedLogs(logging.Handler):
    """Log records at `level` and above from the named loggers, while in use as a context manager."""

    def __init__(self, *names: str, level: int = logging.WARNING):
        super().__init__(level)
        self.names = names
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "RecordedLogs":
        for name in self.names:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in self.names:
            logging.getLogger(name).removeHandler(self)
