"""The beat reconciler: the only component that talks to Slurm.

Each tick, in order:
1. asks the cluster for the state of *every* awaited job in one batched query
   (`Cluster.query` chunks only when the argument list would be too long), and records
   each change of state with its time;
2. submits declared jobs, oldest first, while fewer than `EMG_MAX_ACTIVE_JOBS` of ours
   are pending or running (one more query); a job whose earlier sbatch may have queued it
   is first looked up by its tag and adopted;
3. reads the Prefect state of every flow run with an open wait in one call, and resumes at
   most `EMG_RESUMES_PER_TICK` suspended runs whose awaited jobs have all ended, oldest
   wait first. The rest are resumed by later ticks.

The caller guarantees that one tick runs at a time (see `workers.tasks.reconcile`).
"""

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from django.db.models import F
from django.utils import timezone
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType

from emg.models import ClusterJob, ClusterJobState, JobWait
from slurm_adapter import Cluster, JobSpec, JobStatus, SubmittedJob

logger = logging.getLogger(__name__)

PREFECT_FILTER_CHUNK = 200
# A run that ended can no longer be waiting; Crashed runs are left for the zombie sweep,
# which re-runs them so they re-attach to their jobs.
RELEASING_STATE_TYPES = {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED}


@dataclass
class TickReport:
    checked: int = 0
    changed: dict[str, str] = field(default_factory=dict)
    submitted: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    resumed: list[UUID] = field(default_factory=list)
    released: int = 0
    errors: list[str] = field(default_factory=list)


class Reconciler:
    def __init__(self, cluster: Cluster, prefect: SyncPrefectClient, *, max_active_jobs: int, resumes_per_tick: int):
        self.cluster = cluster
        self.prefect = prefect
        self.max_active_jobs = max_active_jobs
        self.resumes_per_tick = resumes_per_tick

    def tick(self) -> TickReport:
        report = TickReport()
        for step in (self.refresh_job_states, self.submit_declared_jobs, self.resume_ready_flows):
            try:
                step(report)
            except Exception as error:  # one failing step must not starve the others
                logger.exception("reconcile step %s failed", step.__name__)
                report.errors.append(f"{step.__name__}: {error}")
        return report

    def refresh_job_states(self, report: TickReport) -> None:
        jobs = list(ClusterJob.objects.awaited())
        if not jobs:
            return
        statuses = self.cluster.query(
            [SubmittedJob(job_id=job.slurm_job_id, submit_time=job.submit_time, log_path=job.log_path) for job in jobs]
        )
        now = timezone.now()
        report.checked = len(jobs)
        unchanged = []
        for job in jobs:
            status = statuses[job.slurm_job_id]
            if status.state == job.state and status.raw_state == job.raw_state:
                unchanged.append(job.id)
                continue
            record_status(job, status, now)
            report.changed[job.slurm_job_id] = status.state.value
        ClusterJob.objects.filter(id__in=unchanged).update(state_checked_at=now)

    def submit_declared_jobs(self, report: TickReport) -> None:
        declared = list(ClusterJob.objects.declared().order_by("created_at", "id"))
        if not declared:
            return
        room = self.max_active_jobs - self.cluster.count_active()
        for job in declared[: max(room, 0)]:
            spec = JobSpec.from_dict(job.spec)
            if job.submission_started_at is not None:
                found = self.cluster.find_by_tag(job.tag)
                if found:
                    adopt(job, found[0])
                    report.adopted.append(found[0].job_id)
                    continue
            else:
                ClusterJob.objects.filter(id=job.id).update(
                    submission_started_at=timezone.now(), attempts=F("attempts") + 1
                )
                job.refresh_from_db(fields=["attempts", "submission_started_at"])
            submitted = self.cluster.submit(spec, tag=job.tag)
            now = timezone.now()
            ClusterJob.objects.filter(id=job.id).update(
                state=ClusterJobState.SUBMITTED,
                slurm_job_id=submitted.job_id,
                submit_time=submitted.submit_time,
                log_path=submitted.log_path,
                state_checked_at=now,
                history=job.history + [history_entry(ClusterJobState.SUBMITTED, f"sbatch -> {submitted.job_id}", now)],
            )
            report.submitted.append(submitted.job_id)
            logger.info("submitted %s as Slurm job %s (tag %s)", job.name, submitted.job_id, job.tag)

    def resume_ready_flows(self, report: TickReport) -> None:
        waits_by_run: dict[UUID, list[JobWait]] = defaultdict(list)
        for wait in JobWait.objects.filter(released_at__isnull=True).select_related("job").order_by("created_at"):
            waits_by_run[wait.flow_run_id].append(wait)
        if not waits_by_run:
            return
        states = self.read_flow_run_states(list(waits_by_run))
        resumed = 0
        for flow_run_id, waits in waits_by_run.items():
            state = states.get(flow_run_id)
            if state is None or state.type in RELEASING_STATE_TYPES:
                report.released += release(waits)
                continue
            if not (state.type == StateType.PAUSED and all(wait.job.is_final for wait in waits)):
                continue
            if resumed >= self.resumes_per_tick:
                continue
            result = self.prefect.resume_flow_run(flow_run_id)
            if result.status.value != "ACCEPT":
                # Someone else resumed it, or it moved on: nothing to do, the next tick will see.
                logger.info("resume of %s not accepted: %s", flow_run_id, result.details)
                continue
            release(waits)
            resumed += 1
            report.resumed.append(flow_run_id)

    def read_flow_run_states(self, flow_run_ids: list[UUID]) -> dict:
        states = {}
        for start in range(0, len(flow_run_ids), PREFECT_FILTER_CHUNK):
            chunk = flow_run_ids[start : start + PREFECT_FILTER_CHUNK]
            runs = self.prefect.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)), limit=len(chunk)
            )
            states.update({run.id: run.state for run in runs})
        return states


def history_entry(state: str, detail: str, at: datetime) -> dict:
    return {"state": str(state), "detail": detail, "at": at.isoformat()}


def record_status(job: ClusterJob, status: JobStatus, now: datetime) -> None:
    detail = status.raw_state or status.state.value
    if status.exit_code is not None:
        detail += f" exit {status.exit_code}:{status.signal or 0}"
    ClusterJob.objects.filter(id=job.id).update(
        state=status.state.value,
        raw_state=status.raw_state,
        exit_code=status.exit_code,
        signal=status.signal,
        state_checked_at=now,
        history=job.history + [history_entry(status.state.value, detail, now)],
    )


def adopt(job: ClusterJob, status: JobStatus) -> None:
    now = timezone.now()
    ClusterJob.objects.filter(id=job.id).update(
        slurm_job_id=status.job_id,
        submit_time=status.submit_time or now,
        state=status.state.value,
        raw_state=status.raw_state,
        exit_code=status.exit_code,
        signal=status.signal,
        state_checked_at=now,
        history=job.history + [history_entry(status.state.value, f"adopted Slurm job {status.job_id} by tag", now)],
    )
    logger.warning("adopted Slurm job %s for %s: an earlier sbatch had queued it", status.job_id, job.name)


def release(waits: list[JobWait]) -> int:
    return JobWait.objects.filter(id__in=[wait.id for wait in waits], released_at__isnull=True).update(
        released_at=timezone.now()
    )
