"""The beat reconciler: the only component that talks to Slurm. A short coordinator over its steps.

Each tick, in order (one module per step, under workers/reconcile/):
1. `cancellations`: carries out the cancellations operators asked for (flow run stopped, request
   CANCELLED);
2. `reaper`: every live job no live request waits for any more (however its requests ended) is
   given up and stopped, in whatever state it is (looked up by tag first if its claim's answer
   was lost), unless its policy keeps it;
3. `job_states`: one batched query for the state of *every* awaited job, changes recorded,
   jobs that ran out of memory or time declared again with more;
4. `submissions`: declared jobs claimed (a compare-and-set) and submitted, under the cap and the
   rate limit, many of one shape as one job array; a claim whose answer was lost is adopted by its
   tag or superseded;
5. `orphans`: our Slurm jobs that no row owns (an sbatch answer that came after its claim was
   superseded) are cancelled, in ticks that superseded a claim and every few minutes;
6. `child_runs`: one batched Prefect read of every live child run (flows.child_flows) and its
   parent: ended children recorded, children of cancelled parents or ended requests cancelled;
7. `flow_runs`: suspended runs whose jobs (or children) have all ended are resumed (as many a tick as Prefect
   accepts: workers.reconcile.resume_pace); broken ones re-run, and
   drifted ones (deleted from Prefect, Completed while their request is not) get a fresh run;
8. `usage`: what recently ended jobs used (CPU, memory, wall time), from accounting, once each;
9. `prune`: released waits and dispatched events of ended requests, once they are old, deleted.

One bad job, request or run never stops the others: each step isolates them, and a step that
fails as a whole is reported without starving the next. Ticks are made exclusive by
workers.reconcile.lock, but correctness does not rest on that: every write is a compare-and-set
in emg.jobs / emg.requests / emg.waits / emg.children, so even overlapping ticks never submit an attempt twice
(model-checked: docs/protocol/submission.pml).
"""

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from uuid import UUID

from django.conf import settings
from prefect.client.orchestration import SyncPrefectClient

from emg.jobs import UNREADABLE  # noqa: F401  (re-exported: tests and operators name it from here)
from slurm_adapter import Cluster, PartitionLimits
from workers.reconcile.cancellations import cancel_requested
from workers.reconcile.child_runs import tend_child_runs
from workers.reconcile.flow_runs import tend_flow_runs
from workers.reconcile.job_states import refresh_job_states
from workers.reconcile.lock import TickLock
from workers.reconcile.orphans import cancel_orphans
from workers.reconcile.prune import prune_history
from workers.reconcile.reaper import reap_unwanted_jobs
from workers.reconcile.resume_pace import ResumePace
from workers.reconcile.submissions import LockLost, submit_declared_jobs
from workers.reconcile.usage import record_usage

logger = logging.getLogger(__name__)

# Partition limits change with the cluster's configuration, not from tick to tick.
PARTITION_LIMITS_TTL_SECONDS = 3600
_partition_limits: dict[str, tuple[float, dict]] = {}


@dataclass
class TickReport:
    checked: int = 0
    # When the job_states step read every awaited job from the cluster (None: it did not, this tick).
    job_states_read_at: datetime | None = None
    changed: dict[str, str] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)
    submitted: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    # Job arrays submitted: Slurm's array id, and how many of the submitted jobs are its tasks.
    arrays: dict[str, int] = field(default_factory=dict)
    rejected: list[int] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    claims_superseded: int = 0
    orphans_cancelled: list[str] = field(default_factory=list)
    resumed: list[UUID] = field(default_factory=list)
    rerun: list[UUID] = field(default_factory=list)
    # Running with no heartbeat, kept: their runner still holds a live (perhaps stopped) process.
    leased: list[UUID] = field(default_factory=list)
    deferred: list[UUID] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    given_up: list[int] = field(default_factory=list)
    flow_runs_replaced: list[UUID] = field(default_factory=list)
    released: int = 0
    # Child runs (ChildRun ids) whose end was recorded, and those given up, this tick.
    children_ended: list[int] = field(default_factory=list)
    children_given_up: list[int] = field(default_factory=list)
    # Runs without a request (emg.tended_runs) no longer tended this tick: ended, or given up.
    tended_ended: int = 0
    pruned: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


STEPS = (
    cancel_requested,
    reap_unwanted_jobs,
    refresh_job_states,
    submit_declared_jobs,
    cancel_orphans,
    tend_child_runs,
    tend_flow_runs,
    record_usage,
    prune_history,
)


@cache
def settings_resume_pace() -> ResumePace:
    """One pace per tick process, kept from tick to tick (each tick makes a Reconciler of its own)."""
    return ResumePace(
        settings.EMG_RESUMES_PER_TICK,
        ceiling=settings.EMG_RESUMES_PER_TICK_MAX,
        concurrency=settings.EMG_RESUME_CONCURRENCY,
        target_seconds=settings.EMG_RECONCILE_INTERVAL_SECONDS,
    )


class Reconciler:
    def __init__(
        self,
        cluster: Cluster,
        prefect: SyncPrefectClient,
        *,
        max_active_jobs: int,
        max_submissions_per_minute: int,
        resumes_per_tick: int,
        zombie_after: timedelta,
        max_flow_reruns: int,
        claim_lease: timedelta | None = None,
        lock: TickLock | None = None,
        resume_pace: ResumePace | None = None,
        array_min_tasks: int | None = None,
        array_max_tasks: int | None = None,
    ):
        self.cluster = cluster
        self.prefect = prefect
        self.max_active_jobs = max_active_jobs
        self.max_submissions_per_minute = max_submissions_per_minute
        self.resumes_per_tick = resumes_per_tick
        self.zombie_after = zombie_after
        self.max_flow_reruns = max_flow_reruns
        self.claim_lease = (
            claim_lease if claim_lease is not None else timedelta(seconds=settings.EMG_SUBMIT_CLAIM_LEASE_SECONDS)
        )
        self.lock = lock
        # Job arrays: groups of at least `array_min_tasks` declared jobs of one shape (0: never).
        self.array_min_tasks = settings.EMG_ARRAY_MIN_TASKS if array_min_tasks is None else array_min_tasks
        self.array_max_tasks = settings.EMG_ARRAY_MAX_TASKS if array_max_tasks is None else array_max_tasks
        # Without a pace of its own, a fixed `resumes_per_tick` (what a test asks for).
        self.resume_pace = resume_pace or ResumePace(resumes_per_tick, ceiling=resumes_per_tick)

    @classmethod
    def from_settings(cls, cluster: Cluster, prefect: SyncPrefectClient, lock: TickLock | None = None) -> "Reconciler":
        return cls(
            cluster,
            prefect,
            max_active_jobs=settings.EMG_MAX_ACTIVE_JOBS,
            max_submissions_per_minute=settings.EMG_MAX_SUBMISSIONS_PER_MINUTE,
            resumes_per_tick=settings.EMG_RESUMES_PER_TICK,
            zombie_after=timedelta(seconds=settings.EMG_ZOMBIE_AFTER_SECONDS),
            max_flow_reruns=settings.EMG_MAX_FLOW_RERUNS,
            lock=lock,
            resume_pace=settings_resume_pace(),
        )

    def tick(self) -> TickReport:
        report = TickReport()
        for step in STEPS:
            try:
                step(self, report)
            except LockLost as error:
                logger.error("tick stopped: %s", error)
                report.errors.append(str(error))
                break
            except Exception as error:  # one failing step must not starve the others
                logger.exception("reconcile step %s failed", step.__name__)
                report.errors.append(f"{step.__name__}: {error}")
        return report

    def partition_limits(self, partition: str | None) -> PartitionLimits | None:
        """The limits of a job's partition, read from the cluster at most once an hour."""
        cached = _partition_limits.get(self.cluster.name)
        if cached is None or time.monotonic() - cached[0] > PARTITION_LIMITS_TTL_SECONDS:
            try:
                cached = (time.monotonic(), self.cluster.partition_limits())
            except Exception as error:  # no limits known: the policy's caps still hold
                logger.warning("cannot read the cluster's partition limits: %s", error)
                cached = (time.monotonic(), {})
            _partition_limits[self.cluster.name] = cached
        return cached[1].get(partition)
