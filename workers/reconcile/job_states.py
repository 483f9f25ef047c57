"""Reading the state of every awaited job in one batched query, and recording what changed.

Guarantee: one `Cluster.query` call per tick for all awaited jobs (it chunks only when the
argument list would be too long); only when an answer holds a record we cannot read is the batch
halved until that record stands alone. Every change is recorded through emg.jobs, guarded by the
state it was read in, and all of a tick's plain changes in one statement (emg.jobs.record_statuses),
so a tick's cost in SQL does not grow with the number of jobs that changed. Unchanged rows are not
written at all: the tick records when it read every awaited job (ReconcileTick.job_states_read_at).
A job whose state cannot be read is recorded as unreadable and polled on, never cancelled for it.
A job that ran out of memory or time, or lost its node, is declared again with more resources (per
its ResubmitPolicy and the partition's limits) instead of ending.
"""

import dataclasses
import logging

from django.utils import timezone

from emg import jobs
from emg.models import ClusterJob, ClusterJobState
from emg.policies import ResubmitPolicy
from slurm_adapter import ClusterError, JobSpec, JobState, JobStatus, SubmittedJob, UnknownSlurmState
from workers.reconcile.attempts import find_attempt

logger = logging.getLogger(__name__)


def refresh_job_states(reconciler, report) -> None:
    awaited = list(ClusterJob.objects.awaited())
    if not awaited:
        report.job_states_read_at = timezone.now()  # every awaited job (none) is read
        return
    statuses, unreadable = query_readable(
        reconciler.cluster,
        [SubmittedJob(job_id=job.slurm_job_id, submit_time=job.submit_time, log_path=job.log_path) for job in awaited],
    )
    now = timezone.now()
    report.checked = len(awaited)
    report.job_states_read_at = now
    plain_changes: list[tuple[ClusterJob, JobStatus]] = []
    for job in awaited:
        try:
            if job.slurm_job_id in unreadable:
                raw = unreadable[job.slurm_job_id]
                jobs.note_unreadable(job, raw, now)
                report.unreadable[job.slurm_job_id] = raw
                logger.error("Slurm job %s (%s): cannot read its state %r; polling on", job.slurm_job_id, job.name, raw)
                continue
            record_one(reconciler, job, statuses[job.slurm_job_id], now, report, plain_changes)
        except Exception as error:  # one bad job never stops the others
            logger.exception("recording the state of cluster job #%s failed", job.id)
            report.errors.append(f"job #{job.id} (Slurm {job.slurm_job_id}): {error}")
    jobs.record_statuses(plain_changes, now)


def record_one(
    reconciler, job: ClusterJob, status: JobStatus, now, report, plain_changes: list[tuple[ClusterJob, JobStatus]]
) -> bool:
    """Record the job's new state: a resubmission at once, a plain change appended to
    `plain_changes` (recorded with the others in one statement). False when it has not changed."""
    if status.state == JobState.SUBMITTED and job.state != ClusterJobState.SUBMITTED:
        # Slurm has reported this job before: a record missing now is a gap in its answer
        # (accounting lag, a cut-off output), not news.
        logger.warning("Slurm's answer has no record of job %s (last %s); left as it was", job.slurm_job_id, job.state)
        return False
    if status.state == JobState.LOST:
        confirmed = confirm_lost(reconciler, job, status, report)
        if confirmed is None:
            return False
        status = confirmed
    if status.state == job.state and status.raw_state == job.raw_state and not job.unreadable_state:
        return False
    report.changed[job.slurm_job_id] = status.state.value
    retry = (
        None
        if job.cancel_requested_at
        else escalated_spec(job, status, lambda: reconciler.partition_limits(job.spec.get("partition")))
    )  # given up: never again
    if retry is None:
        plain_changes.append((job, status))
    else:
        spec, reason = retry
        if jobs.declare_again(job, status, spec, reason, now):
            report.retried.append(job.slurm_job_id)
    return True


def query_readable(cluster, submitted: list[SubmittedJob]) -> tuple[dict[str, JobStatus], dict[str, str]]:
    """One batched query; if some record in its answer cannot be read, the batch is halved until
    the unreadable jobs stand alone. The statuses read and, per job id, what could not be read."""
    try:
        return cluster.query(submitted), {}
    except ValueError as error:  # UnknownSlurmState, or a field we cannot parse
        if len(submitted) == 1:
            raw = error.raw if isinstance(error, UnknownSlurmState) else str(error)
            return {}, {submitted[0].job_id: raw}
        middle = len(submitted) // 2
        first, first_unreadable = query_readable(cluster, submitted[:middle])
        second, second_unreadable = query_readable(cluster, submitted[middle:])
        return {**first, **second}, {**first_unreadable, **second_unreadable}


def confirm_lost(reconciler, job: ClusterJob, status: JobStatus, report) -> JobStatus | None:
    """A LOST job is resubmitted: look it up by its tag first, in case the answer was only incomplete.

    The status to record, or None to leave the job as it is this tick (the look-up failed).
    """
    try:
        found = [record for record in find_attempt(reconciler.cluster, job) if record.job_id == job.slurm_job_id]
    except (ClusterError, ValueError) as error:
        report.errors.append(f"Slurm job {job.slurm_job_id} seems lost; its tag could not be looked up: {error}")
        return None
    if found:
        report.errors.append(
            f"Slurm job {job.slurm_job_id} was missing from the batched answer; found by its tag, {found[0].state}"
        )
        return found[0]
    return status


def escalated_spec(job: ClusterJob, status: JobStatus, partition_limits=lambda: None) -> tuple[JobSpec, str] | None:
    """The spec to declare the job again with, per its policy, or None when it has really ended.

    Memory and time grow by the policy's factors, capped by the policy and by what the job's
    partition allows (a request above the partition's limit would only be rejected)."""
    if not status.state.is_final or status.state.retry_with is None:
        return None
    policy = ResubmitPolicy.from_dict(job.policy)
    if job.retries + 1 >= policy.max_attempts:
        return None
    spec = JobSpec.from_dict(job.spec)
    # Read only when a limit matters: a steady tick asks Slurm nothing but the states.
    limits = partition_limits() if status.state.retry_with in ("memory", "time") else None
    if status.state.retry_with == "memory":
        cap = (
            min(policy.max_memory_mb, limits.max_memory_mb) if limits and limits.max_memory_mb else policy.max_memory_mb
        )
        memory = min(int(spec.memory_mb * policy.memory_factor), cap)
        if memory <= spec.memory_mb:
            return None
        return dataclasses.replace(spec, memory_mb=memory), f"{status.state}: again with {memory} MB"
    if status.state.retry_with == "time":
        cap = (
            min(policy.max_time_minutes, limits.max_time_minutes)
            if limits and limits.max_time_minutes
            else policy.max_time_minutes
        )
        minutes = min(int(spec.time_limit_minutes * policy.time_factor), cap)
        if minutes <= spec.time_limit_minutes:
            return None
        return dataclasses.replace(spec, time_limit_minutes=minutes), f"{status.state}: again with {minutes} min"
    return spec, f"{status.state}: again as it was"
