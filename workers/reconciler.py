"""The beat reconciler: the only component that talks to Slurm.

Each tick, in order:
1. carries out cancellations operators asked for: cancels the flow run, and `scancel`s each
   live job no other live request is waiting for;
2. asks the cluster for the state of *every* awaited job in one batched query
   (`Cluster.query` chunks only when the argument list would be too long), and records each
   change of state with its time. A job that ran out of memory or time, or lost its node, is
   declared again with more resources (per its ResubmitPolicy) instead of ending;
3. submits declared jobs, oldest first, while fewer than `EMG_MAX_ACTIVE_JOBS` of ours are
   pending or running (one more query) and no more than `EMG_MAX_SUBMISSIONS_PER_MINUTE`
   went out in the last minute. A full queue means waiting, never failing. A job whose
   earlier sbatch may have queued it is first looked up by its tag and adopted;
4. reads the Prefect state of every flow run with an open wait or an unfinished request in
   one call (per 200 runs), resumes at most `EMG_RESUMES_PER_TICK` suspended runs whose
   awaited jobs have all ended, oldest wait first (the rest go to later ticks), and re-runs
   in place any run that crashed, failed, went silent while Running or stayed Pending, at most
   `EMG_MAX_FLOW_RERUNS` times per request generation.

The caller guarantees that one tick runs at a time (see `workers.tasks.reconcile`).
"""

import dataclasses
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import UUID

import httpx
from django.conf import settings
from django.db.models import F
from django.utils import timezone
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import State, StateType
from prefect.states import Cancelled, Scheduled

from emg.models import AnalysisRequest, ClusterJob, ClusterJobState, JobWait
from emg.policies import ResubmitPolicy
from slurm_adapter import (
    Cluster,
    ClusterError,
    JobSpec,
    JobState,
    JobStatus,
    SubmittedJob,
    UnknownSlurmState,
)
from slurm_adapter.files import log_path

logger = logging.getLogger(__name__)

PREFECT_FILTER_CHUNK = 200
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
# The most events one `POST /events/filter` may ask for (the API refuses more).
EVENTS_PAGE_LIMIT = 50
# A run that ended can no longer be waiting. Crashed runs are not here: their request is not
# finished, so the flow-run recovery re-runs them and they re-attach to their jobs.
ENDED_STATE_TYPES = {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED}
RECOVERABLE_STATE_TYPES = {StateType.CRASHED, StateType.FAILED}
# Ticks in a row a job's Slurm record may be unreadable before the job is cancelled and FAILED.
UNKNOWN_STATE_TICKS = 10
# The history entry of a tick that could not read the job's Slurm record.
UNREADABLE = "UNREADABLE"


@dataclass
class TickReport:
    checked: int = 0
    changed: dict[str, str] = field(default_factory=dict)
    submitted: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    resumed: list[UUID] = field(default_factory=list)
    rerun: list[UUID] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    released: int = 0
    errors: list[str] = field(default_factory=list)


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
        unknown_state_ticks: int = UNKNOWN_STATE_TICKS,
    ):
        self.cluster = cluster
        self.prefect = prefect
        self.max_active_jobs = max_active_jobs
        self.max_submissions_per_minute = max_submissions_per_minute
        self.resumes_per_tick = resumes_per_tick
        self.zombie_after = zombie_after
        self.max_flow_reruns = max_flow_reruns
        self.unknown_state_ticks = unknown_state_ticks

    @classmethod
    def from_settings(cls, cluster: Cluster, prefect: SyncPrefectClient) -> "Reconciler":
        return cls(
            cluster,
            prefect,
            max_active_jobs=settings.EMG_MAX_ACTIVE_JOBS,
            max_submissions_per_minute=settings.EMG_MAX_SUBMISSIONS_PER_MINUTE,
            resumes_per_tick=settings.EMG_RESUMES_PER_TICK,
            zombie_after=timedelta(seconds=settings.EMG_ZOMBIE_AFTER_SECONDS),
            max_flow_reruns=settings.EMG_MAX_FLOW_RERUNS,
        )

    def tick(self) -> TickReport:
        report = TickReport()
        for step in (self.cancel_requested, self.refresh_job_states, self.submit_declared_jobs, self.tend_flow_runs):
            try:
                step(report)
            except Exception as error:  # one failing step must not starve the others
                logger.exception("reconcile step %s failed", step.__name__)
                report.errors.append(f"{step.__name__}: {error}")
        return report

    # --- 1. cancellations -----------------------------------------------------------------
    def cancel_requested(self, report: TickReport) -> None:
        requests = AnalysisRequest.objects.filter(cancel_requested_at__isnull=False).exclude(
            status__in=AnalysisRequest.FINAL_STATUSES
        )
        for request in requests:
            if request.flow_run_id:
                self.prefect.set_flow_run_state(
                    request.flow_run_id, Cancelled(message="cancelled by an operator"), force=True
                )
            waits = JobWait.objects.filter(request=request).select_related("job")
            for job in {wait.job for wait in waits if not wait.job.is_final}:
                if job_needed_elsewhere(job, request):
                    logger.info("job %s is shared with a live request: left running", job.slurm_job_id or job.id)
                    continue
                if job.slurm_job_id:
                    self.cluster.cancel(job.slurm_job_id)
                else:
                    record_transition(job, ClusterJobState.CANCELLED, "cancelled before submission", ended=True)
            release(list(waits))
            AnalysisRequest.objects.filter(id=request.id).update(
                status=AnalysisRequest.Status.CANCELLED,
                status_reason="cancelled by an operator",
                finished_at=timezone.now(),
            )
            report.cancelled.append(request.id)

    # --- 2. job states ----------------------------------------------------------------------
    def refresh_job_states(self, report: TickReport) -> None:
        jobs = list(ClusterJob.objects.awaited())
        if not jobs:
            return
        statuses, unreadable = self.query_readable(
            [SubmittedJob(job_id=job.slurm_job_id, submit_time=job.submit_time, log_path=job.log_path) for job in jobs]
        )
        now = timezone.now()
        report.checked = len(jobs)
        unchanged = []
        for job in jobs:
            if job.slurm_job_id in unreadable:
                self.note_unreadable(job, unreadable[job.slurm_job_id], now, report)
                continue
            status = statuses[job.slurm_job_id]
            if status.state == JobState.SUBMITTED and job.state != ClusterJobState.SUBMITTED:
                # Slurm has reported this job before: a record missing now is a gap in its answer
                # (accounting lag, a cut-off output), not news.
                logger.warning("Slurm's answer has no record of job %s (last %s); left as it was",
                               job.slurm_job_id, job.state)
                unchanged.append(job.id)
                continue
            if status.state == JobState.LOST:
                status = self.confirm_lost(job, status, report)
                if status is None:
                    unchanged.append(job.id)
                    continue
            readable_before = not (job.history and job.history[-1].get("state") == UNREADABLE)
            if status.state == job.state and status.raw_state == job.raw_state and readable_before:
                unchanged.append(job.id)
                continue
            report.changed[job.slurm_job_id] = status.state.value
            retry = escalated_spec(job, status)
            if retry is None:
                record_status(job, status, now)
            else:
                spec, reason = retry
                declare_again(job, status, spec, reason, now)
                report.retried.append(job.slurm_job_id)
        ClusterJob.objects.filter(id__in=unchanged).update(state_checked_at=now)

    def query_readable(self, jobs: list[SubmittedJob]) -> tuple[dict[str, JobStatus], dict[str, str]]:
        """One batched query; if some record in its answer cannot be read, the batch is halved
        until the unreadable jobs stand alone. Returns the statuses read and, per job id, what
        could not be read."""
        try:
            return self.cluster.query(jobs), {}
        except ValueError as error:  # UnknownSlurmState, or a field we cannot parse
            if len(jobs) == 1:
                raw = error.raw if isinstance(error, UnknownSlurmState) else str(error)
                return {}, {jobs[0].job_id: raw}
            middle = len(jobs) // 2
            first, first_unreadable = self.query_readable(jobs[:middle])
            second, second_unreadable = self.query_readable(jobs[middle:])
            return {**first, **second}, {**first_unreadable, **second_unreadable}

    def note_unreadable(self, job: ClusterJob, raw: str, now: datetime, report: TickReport) -> None:
        """Another tick that could not read the job's state; the last one allowed cancels and fails it."""
        looks = unreadable_looks(job.history) + 1
        report.errors.append(f"Slurm job {job.slurm_job_id} ({job.name}): cannot read its state {raw!r} "
                             f"({looks}/{self.unknown_state_ticks})")
        entry = history_entry(UNREADABLE, f"Slurm reports {raw!r}, which we cannot read", now)
        if looks < self.unknown_state_ticks:
            ClusterJob.objects.filter(id=job.id).update(state_checked_at=now, history=job.history + [entry])
            return
        try:
            self.cluster.cancel(job.slurm_job_id)
            cancelled = "cancelled it"
        except (ClusterError, ValueError) as error:  # it may be gone already; the job ends here either way
            cancelled = f"scancel failed: {error}"
        detail = f"state {raw!r} unreadable for {looks} ticks: gave up on it and {cancelled}"
        ClusterJob.objects.filter(id=job.id).update(
            state=ClusterJobState.FAILED, raw_state=raw[:64], state_checked_at=now, ended_at=now,
            history=job.history + [entry, history_entry(ClusterJobState.FAILED, detail, now)],
        )
        report.changed[job.slurm_job_id] = ClusterJobState.FAILED
        logger.error("Slurm job %s (%s): %s", job.slurm_job_id, job.name, detail)

    def confirm_lost(self, job: ClusterJob, status: JobStatus, report: TickReport) -> JobStatus | None:
        """A LOST job is resubmitted: look it up by its tag first, in case the answer was only incomplete.

        The status to record, or None to leave the job as it is this tick (the look-up failed).
        """
        try:
            found = [record for record in self.cluster.find_by_tag(job.tag) if record.job_id == job.slurm_job_id]
        except (ClusterError, ValueError) as error:
            report.errors.append(f"Slurm job {job.slurm_job_id} seems lost; its tag could not be looked up: {error}")
            return None
        if found:
            report.errors.append(f"Slurm job {job.slurm_job_id} was missing from the batched answer; "
                                 f"found by its tag, {found[0].state}")
            return found[0]
        return status

    # --- 3. submissions ---------------------------------------------------------------------
    def submit_declared_jobs(self, report: TickReport) -> None:
        declared = list(ClusterJob.objects.declared().order_by("created_at", "id"))
        if not declared:
            return
        recent = ClusterJob.objects.filter(submission_started_at__gte=timezone.now() - timedelta(minutes=1)).count()
        try:
            active = self.cluster.count_active()
        except ValueError as error:  # a queue line we cannot read: count ours instead of never submitting
            report.errors.append(f"cannot count the cluster's active jobs ({error}); counting ours")
            active = ClusterJob.objects.awaited().count()
        room = min(self.max_active_jobs - active, self.max_submissions_per_minute - recent)
        for job in declared[: max(room, 0)]:
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
            submitted = self.cluster.submit(JobSpec.from_dict(job.spec), tag=job.tag)
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

    # --- 4. flow runs -------------------------------------------------------------------------
    def tend_flow_runs(self, report: TickReport) -> None:
        waits_by_run: dict[UUID, list[JobWait]] = defaultdict(list)
        for wait in JobWait.objects.filter(released_at__isnull=True).select_related("job").order_by("created_at"):
            waits_by_run[wait.flow_run_id].append(wait)
        requests_by_run = {
            request.flow_run_id: request
            for request in AnalysisRequest.objects.unfinished().filter(flow_run_id__isnull=False)
        }
        runs = self.read_flow_runs(list(waits_by_run.keys() | requests_by_run.keys()))
        self.resume_ready(waits_by_run, runs, report)
        self.recover_broken(requests_by_run, runs, report)

    def resume_ready(self, waits_by_run: dict[UUID, list[JobWait]], runs: dict, report: TickReport) -> None:
        for flow_run_id, waits in waits_by_run.items():
            run = runs.get(flow_run_id)
            if run is None or run.state.type in ENDED_STATE_TYPES:
                report.released += release(waits)
                continue
            if run.state.type != StateType.PAUSED or not all(wait.job.is_final for wait in waits):
                continue
            if len(report.resumed) >= self.resumes_per_tick:
                continue
            try:
                result = self.prefect.resume_flow_run(flow_run_id)
            except httpx.HTTPStatusError as error:
                logger.info("resume of %s refused (%s); the next tick will look again", flow_run_id, error)
                continue
            if result.status.value != "ACCEPT":
                # Resumed by someone else, or already moving on: normal, not an error.
                logger.info("resume of %s not accepted: %s", flow_run_id, result.details)
                continue
            release(waits)
            report.resumed.append(flow_run_id)

    def recover_broken(self, requests_by_run: dict[UUID, AnalysisRequest], runs: dict, report: TickReport) -> None:
        now = timezone.now()
        suspects = {}
        for flow_run_id, request in requests_by_run.items():
            run = runs.get(flow_run_id)
            if run is None or request.cancel_requested_at is not None:
                continue
            if run.state.type in RECOVERABLE_STATE_TYPES:
                self.rerun(request, run.state, f"flow run {run.state.name.lower()}", report)
            elif run.state.type == StateType.CANCELLED:
                AnalysisRequest.objects.filter(id=request.id).exclude(
                    status__in=AnalysisRequest.FINAL_STATUSES
                ).update(status=AnalysisRequest.Status.CANCELLED, status_reason="flow run cancelled in Prefect",
                         finished_at=now)
            elif run.state.type == StateType.RUNNING and now - run.state.timestamp > self.zombie_after:
                suspects[flow_run_id] = (request, run.state)
            elif run.state.type == StateType.PENDING and now - run.state.timestamp > self.zombie_after:
                # A runner sets Pending and starts the run's process within seconds; a runner that
                # died in between leaves it Pending for good (a restarted one takes Scheduled runs only).
                self.rerun(request, run.state, "flow run stuck Pending (its runner died before starting it)", report)
        if suspects:
            alive = self.runs_with_recent_heartbeat(list(suspects), since=now - self.zombie_after)
            for flow_run_id, (request, state) in suspects.items():
                if flow_run_id not in alive:
                    self.rerun(request, state, "flow run stopped sending heartbeats", report)

    def rerun(self, request: AnalysisRequest, state: State, why: str, report: TickReport) -> None:
        if request.flow_reruns >= self.max_flow_reruns:
            AnalysisRequest.objects.filter(id=request.id).update(
                status=AnalysisRequest.Status.FAILED,
                status_reason=f"{why} and was re-run {request.flow_reruns} times already: {state.message or ''}"[:2000],
                finished_at=timezone.now(),
            )
            return
        self.prefect.set_flow_run_state(request.flow_run_id, Scheduled(message=f"re-run by the reconciler: {why}"),
                                        force=True)
        AnalysisRequest.objects.filter(id=request.id).update(flow_reruns=F("flow_reruns") + 1)
        logger.warning("re-running flow run %s of request #%s: %s", request.flow_run_id, request.id, why)
        report.rerun.append(request.flow_run_id)

    def read_flow_runs(self, flow_run_ids: list[UUID]) -> dict:
        runs = {}
        for start in range(0, len(flow_run_ids), PREFECT_FILTER_CHUNK):
            chunk = flow_run_ids[start : start + PREFECT_FILTER_CHUNK]
            found = self.prefect.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)), limit=len(chunk)
            )
            runs.update({run.id: run for run in found})
        return runs

    def runs_with_recent_heartbeat(self, flow_run_ids: list[UUID], since: datetime) -> set[UUID]:
        """Runs among these that sent a heartbeat since `since`.

        One events query for all of them; only when its page came back full (the API returns at
        most `EVENTS_PAGE_LIMIT` events, and a busy run sends several) is each run not seen in it
        asked about alone, so that a live run is never taken for a zombie for lack of room.
        """
        events = self.heartbeats(flow_run_ids, since, EVENTS_PAGE_LIMIT)
        alive = {heartbeat_run_id(event) for event in events}
        if len(events) >= EVENTS_PAGE_LIMIT:
            for flow_run_id in flow_run_ids:
                if flow_run_id not in alive and self.heartbeats([flow_run_id], since, 1):
                    alive.add(flow_run_id)
        return alive

    def heartbeats(self, flow_run_ids: list[UUID], since: datetime, limit: int) -> list[dict]:
        response = self.prefect.request(
            "POST",
            "/events/filter",
            json={
                "filter": {
                    "occurred": {"since": since.isoformat()},
                    "event": {"name": [HEARTBEAT_EVENT]},
                    "resource": {"id": [f"prefect.flow-run.{run_id}" for run_id in flow_run_ids]},
                },
                "limit": limit,
            },
        )
        return response.json().get("events", [])


def heartbeat_run_id(event: dict) -> UUID:
    return UUID(event["resource"]["prefect.resource.id"].removeprefix("prefect.flow-run."))


def job_needed_elsewhere(job: ClusterJob, cancelled: AnalysisRequest) -> bool:
    return (
        JobWait.objects.filter(job=job, request__isnull=False)
        .exclude(request=cancelled)
        .exclude(request__status__in=AnalysisRequest.FINAL_STATUSES)
        .filter(request__cancel_requested_at__isnull=True)
        .exists()
    )


def escalated_spec(job: ClusterJob, status: JobStatus) -> tuple[JobSpec, str] | None:
    """The spec to declare the job again with, per its policy, or None when it has really ended."""
    if not status.state.is_final or status.state.retry_with is None:
        return None
    policy = ResubmitPolicy.from_dict(job.policy)
    if job.attempts >= policy.max_attempts:
        return None
    spec = JobSpec.from_dict(job.spec)
    if status.state.retry_with == "memory":
        memory = min(int(spec.memory_mb * policy.memory_factor), policy.max_memory_mb)
        if memory <= spec.memory_mb:
            return None
        return dataclasses.replace(spec, memory_mb=memory), f"{status.state}: again with {memory} MB"
    if status.state.retry_with == "time":
        minutes = min(int(spec.time_limit_minutes * policy.time_factor), policy.max_time_minutes)
        if minutes <= spec.time_limit_minutes:
            return None
        return dataclasses.replace(spec, time_limit_minutes=minutes), f"{status.state}: again with {minutes} min"
    return spec, f"{status.state}: again as it was"


def unreadable_looks(history: list[dict]) -> int:
    """Ticks in a row, up to now, that could not read the job's state."""
    looks = 0
    for entry in reversed(history):
        if entry.get("state") != UNREADABLE:
            break
        looks += 1
    return looks


def history_entry(state: str, detail: str, at: datetime) -> dict:
    return {"state": str(state), "detail": detail, "at": at.isoformat()}


def status_detail(status: JobStatus) -> str:
    detail = status.raw_state or status.state.value
    if status.exit_code is not None:
        detail += f" exit {status.exit_code}:{status.signal or 0}"
    return detail


def status_fields(status: JobStatus, now: datetime) -> dict:
    """What a status read from the cluster sets on the job's row."""
    return {
        "state": status.state.value,
        "raw_state": status.raw_state,
        "exit_code": status.exit_code,
        "signal": status.signal,
        "state_checked_at": now,
        "ended_at": now if status.state.is_final else None,
    }


def record_status(job: ClusterJob, status: JobStatus, now: datetime) -> None:
    ClusterJob.objects.filter(id=job.id).update(
        **status_fields(status, now),
        history=job.history + [history_entry(status.state.value, status_detail(status), now)],
    )


def declare_again(job: ClusterJob, status: JobStatus, spec: JobSpec, reason: str, now: datetime) -> None:
    """Same row, same fingerprint, next attempt: flows waiting on it keep waiting."""
    ClusterJob.objects.filter(id=job.id).update(
        state=ClusterJobState.DECLARED,
        raw_state=status.raw_state,
        exit_code=status.exit_code,
        signal=status.signal,
        spec=spec.to_dict(),
        submission_started_at=None,
        state_checked_at=now,
        history=job.history
        + [history_entry(status.state.value, status_detail(status), now), history_entry("DECLARED", reason, now)],
    )
    logger.warning("job %s (Slurm %s) %s", job.name, job.slurm_job_id, reason)


def record_transition(job: ClusterJob, state: str, detail: str, *, ended: bool) -> None:
    now = timezone.now()
    ClusterJob.objects.filter(id=job.id).update(
        state=state, state_checked_at=now, ended_at=now if ended else None,
        history=job.history + [history_entry(state, detail, now)],
    )


def adopt(job: ClusterJob, status: JobStatus) -> None:
    now = timezone.now()
    ClusterJob.objects.filter(id=job.id).update(
        **status_fields(status, now),
        slurm_job_id=status.job_id,
        log_path=log_path(job.spec["work_dir"], job.tag, status.job_id),
        submit_time=status.submit_time or now,
        history=job.history + [history_entry(status.state.value, f"adopted Slurm job {status.job_id} by tag", now)],
    )
    logger.warning("adopted Slurm job %s for %s: an earlier sbatch had queued it", status.job_id, job.name)


def release(waits: list[JobWait]) -> int:
    return JobWait.objects.filter(id__in=[wait.id for wait in waits], released_at__isnull=True).update(
        released_at=timezone.now()
    )
