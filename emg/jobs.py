"""Every change of a ClusterJob's state, each one a compare-and-set.

A function here takes the row as its caller read it and changes it only if the row is still
what was read: `UPDATE ... WHERE id = ? AND state = ? AND attempts = ? [AND claim = ?]`, with the
history entry appended in the same statement. It returns whether the update applied, and the
caller acts on the cluster (`sbatch`, `scancel`, adopting a job) only when it did. A change that
no longer applies is logged and skipped, never forced: some other tick (or an operator) moved
the row on, and what it did stands.

Nothing else writes a job's `state`, `attempts`, `submission_started_at`, `slurm_job_id`,
`retries` or `history` (tests/test_transition_owners.py checks). The submission protocol these
steps make up, with several ticks overlapping, crashing and losing sbatch answers, is
model-checked in docs/protocol/submission.pml.

The submission of one attempt:
    claim -> sbatch -> record_submission            (the answer came back)
                    -> note_submit_error            (a transient error: retried after a backoff)
                    -> reject                       (Slurm refused the job for good)
    a claim whose answer never came (the tick died, froze, or its sbatch timed out) is, once
    stale, looked up by its tag: found -> adopt; not found -> reclaim (the next attempt) -> sbatch.
"""

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from emg import waits
from emg.history import HistoryEntry, apply_transition
from emg.models import FINAL_JOB_STATES, ClusterJob, ClusterJobState, job_tag
from slurm_adapter import JobSpec, JobStatus, SubmittedJob

logger = logging.getLogger(__name__)

# History entries of steps that are not a state of their own.
CLAIMED = "CLAIMED"
SUBMIT_ERROR = "SUBMIT_ERROR"
UNREADABLE = "UNREADABLE"
GIVEN_UP = "GIVEN_UP"


@dataclass(frozen=True)
class Claim:
    """The right, won by one compare-and-set, to run sbatch for one attempt of one job."""

    job_id: int
    attempt: int
    at: datetime
    tag: str
    spec: dict[str, Any]
    # The job array this attempt goes into, and its index there ("" / None: submitted on its own).
    array_tag: str = ""
    array_index: int | None = None


def _claimed_row(claim: Claim) -> QuerySet[ClusterJob]:
    return ClusterJob.objects.filter(
        id=claim.job_id, state=ClusterJobState.DECLARED, attempts=claim.attempt, submission_started_at=claim.at
    )


def _as_read(job: ClusterJob) -> QuerySet[ClusterJob]:
    """The row, only if it is still in the state, attempt and claim it was read in."""
    claim = (
        Q(submission_started_at__isnull=True)
        if job.submission_started_at is None
        else Q(submission_started_at=job.submission_started_at)
    )
    return ClusterJob.objects.filter(
        claim, id=job.id, state=job.state, attempts=job.attempts, slurm_job_id=job.slurm_job_id
    )


def _apply(
    rows: QuerySet[ClusterJob],
    job_id: int,
    step: str,
    entries: HistoryEntry | list[HistoryEntry] | None,
    **changes: Any,
) -> bool:
    return apply_transition(rows, f"cluster job #{job_id}", step, entries, logger, **changes)


def _claim_from(
    job: ClusterJob, attempt: int, at: datetime, array_tag: str = "", array_index: int | None = None
) -> Claim:
    return Claim(
        job_id=job.id,
        attempt=attempt,
        at=at,
        tag=job_tag(job.fingerprint, job.id, attempt),
        spec=job.spec,
        array_tag=array_tag,
        array_index=array_index,
    )


# --- submission ----------------------------------------------------------------------------------


def claim(
    job: ClusterJob, now: datetime | None = None, *, array_tag: str = "", array_index: int | None = None
) -> Claim | None:
    """Claim the next attempt of a declared, unclaimed job: only the winner may run sbatch.

    With `array_tag`, the attempt is claimed as task `array_index` of that job array (recorded on
    the row, so that a claim whose answer was lost is looked up by the array's tag)."""
    now = now or timezone.now()
    if job.state != ClusterJobState.DECLARED or job.submission_started_at is not None or job.cancel_requested_at:
        return None
    attempt = job.attempts + 1
    rows = ClusterJob.objects.filter(
        id=job.id,
        state=ClusterJobState.DECLARED,
        attempts=job.attempts,
        submission_started_at__isnull=True,
        cancel_requested_at__isnull=True,
    )
    detail = f"attempt {attempt}: submitting" + (f" as task {array_index} of array {array_tag}" if array_tag else "")
    entry = HistoryEntry(CLAIMED, detail, now)
    if not _apply(
        rows,
        job.id,
        "claim",
        entry,
        attempts=attempt,
        submission_started_at=now,
        next_submit_at=None,
        array_tag=array_tag,
        array_index=array_index if array_tag else None,
    ):
        return None
    return _claim_from(job, attempt, now, array_tag, array_index if array_tag else None)


def reclaim(job: ClusterJob, why: str, now: datetime | None = None) -> Claim | None:
    """Supersede a stale claim whose attempt Slurm does not know with the next attempt."""
    now = now or timezone.now()
    if job.state != ClusterJobState.DECLARED or job.submission_started_at is None or job.cancel_requested_at:
        return None
    attempt = job.attempts + 1
    entry = HistoryEntry(CLAIMED, f"attempt {attempt}: submitting again ({why})", now)
    rows = _as_read(job).filter(cancel_requested_at__isnull=True)
    # The next attempt goes to Slurm on its own, whether or not the superseded one was an array's task.
    if not _apply(
        rows,
        job.id,
        "reclaim",
        entry,
        attempts=attempt,
        submission_started_at=now,
        next_submit_at=None,
        array_tag="",
        array_index=None,
    ):
        return None
    return _claim_from(job, attempt, now)


def record_submission(claim: Claim, submitted: SubmittedJob, now: datetime | None = None) -> bool:
    """sbatch answered for this claim. False: the claim was superseded meanwhile, and the job
    just queued belongs to no row: the caller must scancel it."""
    now = now or timezone.now()
    entry = HistoryEntry(ClusterJobState.SUBMITTED, f"sbatch -> {submitted.job_id}", now)
    return _apply(
        _claimed_row(claim),
        claim.job_id,
        "record_submission",
        entry,
        state=ClusterJobState.SUBMITTED,
        slurm_job_id=submitted.job_id,
        submit_time=submitted.submit_time,
        log_path=submitted.log_path,
        state_checked_at=now,
        submit_error="",
        next_submit_at=None,
    )


def note_submit_error(claim: Claim, error: str, retry_at: datetime, now: datetime | None = None) -> bool:
    """sbatch failed in a way that may pass (a busy or unreachable controller). The claim stays:
    the job may have been queued all the same, so the retry first looks the tag up."""
    now = now or timezone.now()
    entry = HistoryEntry(SUBMIT_ERROR, f"{error} (retry after {retry_at.isoformat()})"[:2000], now)
    return _apply(
        _claimed_row(claim),
        claim.job_id,
        "note_submit_error",
        entry,
        submit_error=error[:2000],
        next_submit_at=retry_at,
    )


def reject(claim: Claim, message: str, now: datetime | None = None) -> bool:
    """Slurm refused the job for good (invalid partition, limits, account, QOS): it ends here."""
    now = now or timezone.now()
    entry = HistoryEntry(ClusterJobState.REJECTED, message[:2000], now)
    return _apply(
        _claimed_row(claim),
        claim.job_id,
        "reject",
        entry,
        state=ClusterJobState.REJECTED,
        submit_error=message[:2000],
        next_submit_at=None,
        ended_at=now,
        state_checked_at=now,
    )


def adopt(job: ClusterJob, status: JobStatus, log_path: str, now: datetime | None = None) -> bool:
    """A claimed job's sbatch queued it although its answer was lost: take that Slurm job as the attempt's."""
    now = now or timezone.now()
    entry = HistoryEntry(status.state.value, f"adopted Slurm job {status.job_id} by tag", now)
    return _apply(
        _as_read(job),
        job.id,
        "adopt",
        entry,
        **status_fields(status, now),
        slurm_job_id=status.job_id,
        log_path=log_path,
        submit_time=status.submit_time or now,
        submit_error="",
        next_submit_at=None,
    )


# --- the cluster's answers ---------------------------------------------------------------------------


def status_fields(status: JobStatus, now: datetime) -> dict[str, Any]:
    """What a status read from the cluster sets on the job's row."""
    return {
        "state": status.state.value,
        "raw_state": status.raw_state,
        "exit_code": status.exit_code,
        "signal": status.signal,
        "state_checked_at": now,
        "ended_at": now if status.state.is_final else None,
        "unreadable_state": "",
        "unreadable_since": None,
    }


def status_detail(status: JobStatus) -> str:
    detail = status.raw_state or status.state.value
    if status.exit_code is not None:
        detail += f" exit {status.exit_code}:{status.signal or 0}"
    return detail


def record_status(job: ClusterJob, status: JobStatus, now: datetime | None = None) -> bool:
    """Slurm reports a new state for a submitted job."""
    now = now or timezone.now()
    entry = HistoryEntry(status.state.value, status_detail(status), now)
    return _apply(_as_read(job), job.id, "record_status", entry, **status_fields(status, now))


def declare_again(job: ClusterJob, status: JobStatus, spec: JobSpec, reason: str, now: datetime | None = None) -> bool:
    """Same row, same fingerprint, next attempt (with more resources): flows waiting on it keep
    waiting. The ended attempt's Slurm id stays in the history, not on the row: a declared job has none."""
    now = now or timezone.now()
    entries = [
        HistoryEntry(status.state.value, f"{status_detail(status)} (Slurm job {job.slurm_job_id})", now),
        HistoryEntry(ClusterJobState.DECLARED, reason, now),
    ]
    if not _apply(
        _as_read(job),
        job.id,
        "declare_again",
        entries,
        state=ClusterJobState.DECLARED,
        raw_state=status.raw_state,
        exit_code=status.exit_code,
        signal=status.signal,
        spec=spec.to_dict(),
        retries=job.retries + 1,
        slurm_job_id="",
        submission_started_at=None,
        next_submit_at=None,
        submit_error="",
        state_checked_at=now,
        unreadable_state="",
        unreadable_since=None,
        array_tag="",
        array_index=None,
    ):
        return False
    logger.warning("job %s (Slurm %s) %s", job.name, job.slurm_job_id, reason)
    return True


def note_unreadable(job: ClusterJob, raw: str, now: datetime | None = None) -> bool:
    """Slurm answered for the job with a state we cannot read: recorded, alerted, polled again.

    Never a reason to cancel or fail it: a multi-day job is left to finish. The history gets one
    entry when it became unreadable, not one per tick."""
    now = now or timezone.now()
    if job.unreadable_state == raw[:64]:
        return _apply(_as_read(job), job.id, "note_unreadable", None, state_checked_at=now)
    entry = HistoryEntry(UNREADABLE, f"Slurm reports {raw!r}, which we cannot read; polling on", now)
    return _apply(
        _as_read(job),
        job.id,
        "note_unreadable",
        entry,
        unreadable_state=raw[:64],
        unreadable_since=job.unreadable_since or now,
        state_checked_at=now,
    )


def cancel_unsubmitted(job: ClusterJob, detail: str, now: datetime | None = None) -> bool:
    """A declared job no one needs any more ends before Slurm ever ran it.

    For a claimed job the caller must first have looked its tag up and found nothing, with the
    claim stale: a late sbatch answer then finds its claim gone and cancels its own job."""
    now = now or timezone.now()
    if job.state != ClusterJobState.DECLARED:
        return False
    entry = HistoryEntry(ClusterJobState.CANCELLED, detail, now)
    return _apply(
        _as_read(job),
        job.id,
        "cancel_unsubmitted",
        entry,
        state=ClusterJobState.CANCELLED,
        ended_at=now,
        state_checked_at=now,
        next_submit_at=None,
    )


def give_up(job: ClusterJob, why: str, now: datetime | None = None) -> bool:
    """No live request waits for this job any more: give it up (the reconciler then stops it in
    Slurm) or, declared and unclaimed, cancel it outright; whether this call did.

    Serialised with `emg.waits.attach` on the job's row (SELECT ... FOR UPDATE, then the waiters
    are read afresh): a flow attaching at that moment is either seen here, and the job is kept, or
    sees the job given up and declares a new one. No flow ever waits on a job being cancelled.
    """
    now = now or timezone.now()
    with transaction.atomic():
        current = ClusterJob.objects.select_for_update().filter(id=job.id).first()
        if current is None or current.is_final or current.cancel_requested_at is not None:
            return False
        if waits.job_is_wanted(current.id):
            return False
        if current.state == ClusterJobState.DECLARED and current.submission_started_at is None:
            return cancel_unsubmitted(current, why, now)
        return _apply(
            _as_read(current).filter(cancel_requested_at__isnull=True),
            current.id,
            "give_up",
            HistoryEntry(GIVEN_UP, why, now),
            cancel_requested_at=now,
        )


def record_manifest(job: ClusterJob, manifest: dict[str, str], now: datetime | None = None) -> bool:
    """The sha256 of each declared output of a COMPLETED job, recorded once (the first reader's)."""
    now = now or timezone.now()
    rows = ClusterJob.objects.filter(id=job.id, state=ClusterJobState.COMPLETED, output_manifest__isnull=True)
    return _apply(rows, job.id, "record_manifest", None, output_manifest=manifest, manifest_recorded_at=now)


def record_usage(job: ClusterJob, usage: dict[str, Any]) -> bool:
    """What an ended attempt used, from accounting, recorded once for the Slurm job it names."""
    rows = ClusterJob.objects.filter(
        id=job.id, state=job.state, slurm_job_id=job.slurm_job_id, usage__isnull=True, state__in=FINAL_JOB_STATES
    )
    return _apply(rows, job.id, "record_usage", None, usage=usage)


# One statement for any number of jobs: each column is one array parameter (no limit on rows, as
# a VALUES list of 12 parameters a row would meet PostgreSQL's 65,535 at 5,000 rows), and the guard
# of `_as_read` is joined row by row.
RECORD_STATUSES_SQL = """
UPDATE emg_clusterjob AS job SET
    state = new.state, raw_state = new.raw_state, exit_code = new.exit_code, signal = new.signal,
    state_checked_at = %(now)s, ended_at = new.ended_at, unreadable_state = '', unreadable_since = NULL,
    updated_at = %(now)s, history = job.history || new.entry
FROM unnest(%(ids)s::bigint[], %(read_states)s::text[], %(read_attempts)s::integer[],
            %(read_slurm_job_ids)s::text[], %(read_claims)s::timestamptz[], %(states)s::text[],
            %(raw_states)s::text[], %(exit_codes)s::integer[], %(signals)s::integer[], %(ended_ats)s::timestamptz[],
            %(entries)s::jsonb[])
    AS new(id, read_state, read_attempts, read_slurm_job_id, read_claim, state, raw_state, exit_code, signal,
           ended_at, entry)
WHERE job.id = new.id AND job.state = new.read_state AND job.attempts = new.read_attempts
    AND job.slurm_job_id = new.read_slurm_job_id AND job.submission_started_at IS NOT DISTINCT FROM new.read_claim
RETURNING job.id
"""


def record_statuses(changes: list[tuple[ClusterJob, JobStatus]], now: datetime | None = None) -> set[int]:
    """`record_status` for many jobs at once, each guarded as it was read, in one UPDATE (on
    PostgreSQL; row by row elsewhere). The ids of the jobs whose update applied."""
    now = now or timezone.now()
    if not changes:
        return set()
    if connection.vendor != "postgresql":
        return {job.id for job, status in changes if record_status(job, status, now)}
    fields = [(job, status, status_fields(status, now)) for job, status in changes]
    with connection.cursor() as cursor:
        cursor.execute(
            RECORD_STATUSES_SQL,
            {
                "now": now,
                "ids": [job.id for job, _, _ in fields],
                "read_states": [job.state for job, _, _ in fields],
                "read_attempts": [job.attempts for job, _, _ in fields],
                "read_slurm_job_ids": [job.slurm_job_id for job, _, _ in fields],
                "read_claims": [job.submission_started_at for job, _, _ in fields],
                "states": [new["state"] for _, _, new in fields],
                "raw_states": [new["raw_state"] for _, _, new in fields],
                "exit_codes": [new["exit_code"] for _, _, new in fields],
                "signals": [new["signal"] for _, _, new in fields],
                "ended_ats": [new["ended_at"] for _, _, new in fields],
                "entries": [
                    json.dumps([HistoryEntry(status.state.value, status_detail(status), now).to_json()])
                    for _, status, _ in fields
                ],
            },
        )
        applied = {row[0] for row in cursor.fetchall()}
    for job, _, _ in fields:
        if job.id not in applied:
            logger.info("cluster job #%s: record_status skipped, the row has moved on since it was read", job.id)
    return applied
