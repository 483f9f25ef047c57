"""Submitting declared jobs: claimed before sbatch, recorded only under the claim that won.

Guarantee: one attempt of one job is given to sbatch at most once, however many ticks overlap,
freeze or die, because only the tick whose claim (a compare-and-set in emg.jobs) applied runs
sbatch for it, and a claim whose answer was lost is superseded only after its tag has been looked
up in Slurm and not found. The protocol is model-checked in docs/protocol/submission.pml.

The pre-cluster delay lives here too: declared jobs wait, never fail, while `max_active_jobs` of
ours are pending or running or `max_submissions_per_minute` were claimed in the last minute.
"""

import logging
from datetime import datetime, timedelta

from django.db.models import Exists, OuterRef
from django.utils import timezone

from emg import jobs
from emg.models import ClusterJob
from slurm_adapter import ClusterError, JobSpec, JobStatus, SubmissionRejected
from slurm_adapter.files import log_path

logger = logging.getLogger(__name__)

# After a transient sbatch error the job waits this long, doubling per error in a row, up to the cap.
FIRST_BACKOFF = timedelta(seconds=30)
MAX_BACKOFF = timedelta(minutes=10)


class LockLost(RuntimeError):
    """The tick's lock went away (its connection dropped): stop before the next sbatch."""


def submit_declared_jobs(reconciler, report) -> None:
    now = timezone.now()
    # A job given up is the reaper's to stop, never submitted (workers.reconcile.reaper).
    declared = list(ClusterJob.objects.declared().filter(cancel_requested_at__isnull=True).order_by("created_at", "id"))
    if not declared:
        return
    # An identical job given up but not yet ended still works in the directory both are named by:
    # its successor waits for it to end.
    blocked = set(
        ClusterJob.objects.filter(id__in=[job.id for job in declared])
        .filter(
            Exists(
                ClusterJob.objects.live().filter(fingerprint=OuterRef("fingerprint"), cancel_requested_at__isnull=False)
            )
        )
        .values_list("id", flat=True)
    )
    recent = ClusterJob.objects.filter(submission_started_at__gte=now - timedelta(minutes=1)).count()
    try:
        active = reconciler.cluster.count_active()
    except ValueError as error:  # a queue line we cannot read: count ours instead of never submitting
        report.errors.append(f"cannot count the cluster's active jobs ({error}); counting ours")
        active = ClusterJob.objects.awaited().count()
    room = min(reconciler.max_active_jobs - active, reconciler.max_submissions_per_minute - recent)
    for job in declared:
        if room <= 0:
            break
        if job.id in blocked:
            continue
        try:
            if submit_one(reconciler, job, now, report):
                room -= 1
        except LockLost:
            raise
        except Exception as error:  # one bad job never stops the others
            logger.exception("submitting cluster job #%s failed", job.id)
            report.errors.append(f"submit job #{job.id} ({job.name}): {error}")


def claim_is_stale(job: ClusterJob, now: datetime, lease: timedelta) -> bool:
    """Whether the claim's sbatch has certainly returned (or been killed) by now."""
    if job.next_submit_at is not None:
        return now >= job.next_submit_at
    return job.submission_started_at is None or now - job.submission_started_at >= lease


def submit_one(reconciler, job: ClusterJob, now: datetime, report) -> bool:
    """Take one declared job one step on; whether a submission slot was used."""
    if job.submission_started_at is None:
        claim = jobs.claim(job)
        if claim is None:
            return False
    else:
        if not claim_is_stale(job, now, reconciler.claim_lease):
            return False  # its sbatch may still answer: leave it to its tick
        claim = adopt_or_reclaim(reconciler, job, report)
        if claim is None:
            return False
    if reconciler.lock is not None and not reconciler.lock.still_held():
        raise LockLost("the tick lock is gone; the claimed job waits for the next tick's look-up")
    sbatch(reconciler, claim, job, report)
    return True


class LookupFailed(Exception):
    """Slurm could not be asked for a claimed attempt's tag: nothing may be decided about it this tick."""


def adopt_by_tag(reconciler, job: ClusterJob, report) -> JobStatus | None:
    """Look a claimed attempt's tag up in Slurm; the job found, adopted for the row, or None if Slurm
    has none. Raises LookupFailed (reported) when the look-up itself failed."""
    try:
        found = reconciler.cluster.find_by_tag(job.tag, spec_name=job.spec["name"], since=job.submission_started_at)
    except (ClusterError, ValueError) as error:
        report.errors.append(f"job #{job.id}: its claimed attempt could not be looked up by tag: {error}")
        raise LookupFailed(str(error)) from error
    if not found:
        return None
    status = found[0]
    if jobs.adopt(job, status, log_path(job.spec["work_dir"], job.tag, status.job_id)):
        report.adopted.append(status.job_id)
        logger.warning("adopted Slurm job %s for %s: an earlier sbatch had queued it", status.job_id, job.name)
    return status


def adopt_or_reclaim(reconciler, job: ClusterJob, report) -> jobs.Claim | None:
    """A stale claim: its tag found in Slurm means the job was queued (adopt it); not found, the
    next attempt is claimed. A look-up that fails decides nothing."""
    try:
        if adopt_by_tag(reconciler, job, report) is not None:
            return None
    except LookupFailed:
        return None
    why = job.submit_error or "the claiming tick never recorded an answer"
    claim = jobs.reclaim(job, f"attempt {job.attempts} is unknown to Slurm: {why}"[:500])
    if claim is not None:
        report.claims_superseded += 1
    return claim


def sbatch(reconciler, claim: jobs.Claim, job: ClusterJob, report) -> None:
    try:
        submitted = reconciler.cluster.submit(JobSpec.from_dict(claim.spec), tag=claim.tag)
    except SubmissionRejected as error:
        if jobs.reject(claim, f"Slurm refused the job: {error}"):
            report.rejected.append(job.id)
            logger.error("Slurm refused job %s (%s): %s", job.id, job.name, error)
        return
    except (ClusterError, ValueError) as error:
        retry_at = timezone.now() + backoff(job)
        jobs.note_submit_error(claim, str(error), retry_at)
        report.errors.append(
            f"sbatch for job #{job.id} ({job.name}) failed, retried after {retry_at:%H:%M:%S}: {error}"
        )
        return
    if jobs.record_submission(claim, submitted):
        report.submitted.append(submitted.job_id)
        logger.info("submitted %s as Slurm job %s (tag %s)", job.name, submitted.job_id, claim.tag)
        return
    # The claim was superseded while sbatch ran (this tick was frozen past its lease). Another tick
    # either adopted this very job by its tag (then it is the row's, and stays), or moved the row on
    # (the next attempt, or cancelled): that can no longer change for this attempt, so the job just
    # queued belongs to no row and is cancelled.
    if ClusterJob.objects.filter(id=job.id, slurm_job_id=submitted.job_id).exists():
        logger.info("job #%s: a late sbatch answer for %s, already adopted by tag", job.id, claim.tag)
        return
    report.errors.append(
        f"job #{job.id}: claim {claim.tag} was superseded while sbatch ran; "
        f"cancelled the Slurm job {submitted.job_id} it queued"
    )
    reconciler.cluster.cancel(submitted.job_id)


def backoff(job: ClusterJob) -> timedelta:
    errors_in_a_row = 0
    for entry in reversed(job.history):
        if entry.get("state") == jobs.SUBMIT_ERROR:
            errors_in_a_row += 1
        elif entry.get("state") != jobs.CLAIMED:
            break
    return min(FIRST_BACKOFF * (2**errors_in_a_row), MAX_BACKOFF)
