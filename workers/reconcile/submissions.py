"""Submitting declared jobs: claimed before sbatch, recorded only under the claim that won.

Guarantee: one attempt of one job is given to sbatch at most once, however many ticks overlap,
freeze or die, because only the tick whose claim (a compare-and-set in emg.jobs) applied runs
sbatch for it, and a claim whose answer was lost is superseded only after its tag has been looked
up in Slurm and not found. The protocol is model-checked in docs/protocol/submission.pml.

The pre-cluster delay lives here too: declared jobs wait, never fail, while `max_active_jobs` of
ours are pending or running or `max_submissions_per_minute` were claimed in the last minute.

Job arrays: unclaimed declared jobs of one shape (slurm_adapter.arrays.shape: the same resources
and sbatch options), at least `array_min_tasks` of them, go to Slurm as one array: each row is
claimed by its own compare-and-set (only the rows whose claim applied become tasks, numbered in
the order they were claimed), one sbatch `--array=0-(n-1)%cap` submits them, and each row records
its task ("<array>_<index>") under its own claim, as a job submitted alone would. The array is one
submission of the minute's budget; its tasks count one each against `max_active_jobs` once queued,
and the `%` cap (the room under `max_active_jobs` when it was submitted) keeps the running ones
within it, while the rest wait in Slurm's queue as one pending record. A task is a job like any
other from then on: its state, a retry with more memory (declared again, submitted on its own),
its cancellation. A claimed task whose answer was lost is looked up by the array's tag and its index.
"""

import logging
from collections import defaultdict
from datetime import datetime, timedelta

from django.db.models import Exists, OuterRef
from django.utils import timezone

from emg import jobs
from emg.models import ClusterJob, array_tag
from slurm_adapter import ArrayTask, ClusterError, JobSpec, JobStatus, SubmissionRejected
from slurm_adapter.arrays import shape
from slurm_adapter.files import log_path
from workers.reconcile.attempts import array_files_dir, find_attempt

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
    # A job array is one submission, however many tasks it has.
    claimed = ClusterJob.objects.filter(submission_started_at__gte=now - timedelta(minutes=1))
    recent = claimed.filter(array_tag="").count() + claimed.exclude(array_tag="").values("array_tag").distinct().count()
    try:
        active = reconciler.cluster.count_active()
    except ValueError as error:  # a queue line we cannot read: count ours instead of never submitting
        report.errors.append(f"cannot count the cluster's active jobs ({error}); counting ours")
        active = ClusterJob.objects.awaited().count()
    active_room = reconciler.max_active_jobs - active
    submissions_left = reconciler.max_submissions_per_minute - recent
    in_arrays: set[int] = set()
    for group in array_groups(reconciler, [job for job in declared if job.id not in blocked]):
        if active_room <= 0 or submissions_left <= 0:
            break
        try:
            tasks = submit_array(reconciler, group, active_room, report)
        except LockLost:
            raise
        except Exception as error:  # one bad array never stops the other submissions
            logger.exception("submitting an array of %s cluster jobs failed", len(group))
            report.errors.append(f"submit an array of {len(group)} jobs (#{group[0].id}...): {error}")
            tasks = 0
        in_arrays.update(job.id for job in group)
        if tasks:
            submissions_left -= 1
            active_room -= tasks
    room = min(active_room, submissions_left)
    for job in declared:
        if room <= 0:
            break
        if job.id in blocked or job.id in in_arrays:
            continue
        try:
            if submit_one(reconciler, job, now, report):
                room -= 1
        except LockLost:
            raise
        except Exception as error:  # one bad job never stops the others
            logger.exception("submitting cluster job #%s failed", job.id)
            report.errors.append(f"submit job #{job.id} ({job.name}): {error}")


def array_groups(reconciler, declared: list[ClusterJob]) -> list[list[ClusterJob]]:
    """The unclaimed declared jobs to submit as arrays: of one shape, at least `array_min_tasks`
    of them, at most `array_max_tasks` an array; oldest first. None where the cluster has no arrays."""
    minimum = reconciler.array_min_tasks
    if minimum <= 0 or not getattr(reconciler.cluster, "supports_arrays", False):
        return []
    by_shape: dict[tuple[object, ...], list[ClusterJob]] = defaultdict(list)
    for job in declared:
        if job.submission_started_at is None and job.cancel_requested_at is None:
            by_shape[shape(JobSpec.from_dict(job.spec))].append(job)
    size = max(reconciler.array_max_tasks, 1)
    groups = [
        jobs_of_shape[start : start + size]
        for jobs_of_shape in by_shape.values()
        for start in range(0, len(jobs_of_shape), size)
    ]
    return [group for group in groups if len(group) >= max(minimum, 2)]


def submit_array(reconciler, group: list[ClusterJob], active_room: int, report) -> int:
    """Claim each job of the group into one array and submit it with one sbatch; how many tasks it has.

    A job whose claim does not apply (another tick took it, or it was given up) is left out. The
    array's tag is taken from the first claim that applied, which no other array can share."""
    claims: list[jobs.Claim] = []
    tag = ""
    now = timezone.now()
    for job in group:
        candidate = tag or array_tag(job.id, job.attempts + 1)
        claim = jobs.claim(job, now, array_tag=candidate, array_index=len(claims))
        if claim is not None:
            tag = candidate
            claims.append(claim)
    if not claims:
        return 0
    # Even if only one claim applied, it was claimed as task 0 of the array: it goes as an array of one.
    if reconciler.lock is not None and not reconciler.lock.still_held():
        raise LockLost("the tick lock is gone; the claimed jobs wait for the next tick's look-up")
    rows = {job.id: job for job in group}
    tasks = [ArrayTask(JobSpec.from_dict(claim.spec), claim.tag) for claim in claims]
    max_running = active_room if active_room < len(tasks) else None
    try:
        submitted = reconciler.cluster.submit_array(
            tasks, array_tag=tag, files_dir=str(array_files_dir(tag)), max_running=max_running
        )
    except SubmissionRejected as error:
        for claim in claims:
            if jobs.reject(claim, f"Slurm refused the job array {tag}: {error}"):
                report.rejected.append(claim.job_id)
        logger.error("Slurm refused the job array %s of %s jobs: %s", tag, len(claims), error)
        return 0
    except (ClusterError, ValueError) as error:
        retry_at = timezone.now() + backoff(rows[claims[0].job_id])
        for claim in claims:
            jobs.note_submit_error(claim, str(error), retry_at)
        report.errors.append(
            f"sbatch for the job array {tag} of {len(claims)} jobs failed, "
            f"looked up and retried after {retry_at:%H:%M:%S}: {error}"
        )
        return 0
    for claim, task in zip(claims, submitted, strict=True):
        record_or_cancel(reconciler, claim, rows[claim.job_id], task, report)
    array_id = submitted[0].job_id.partition("_")[0]
    report.arrays[array_id] = len(claims)
    logger.info("submitted %s jobs as Slurm job array %s (tag %s)", len(claims), array_id, tag)
    return len(claims)


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
        found = find_attempt(reconciler.cluster, job)
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
    if record_or_cancel(reconciler, claim, job, submitted, report):
        logger.info("submitted %s as Slurm job %s (tag %s)", job.name, submitted.job_id, claim.tag)


def record_or_cancel(reconciler, claim: jobs.Claim, job: ClusterJob, submitted, report) -> bool:
    """Record what sbatch queued for this claim; whether it is the row's now. A job (or array task)
    queued for a claim superseded meanwhile is cancelled, unless a look-up adopted it already."""
    if jobs.record_submission(claim, submitted):
        report.submitted.append(submitted.job_id)
        return True
    # The claim was superseded while sbatch ran (this tick was frozen past its lease). Another tick
    # either adopted this very job by its tag (then it is the row's, and stays), or moved the row on
    # (the next attempt, or cancelled): that can no longer change for this attempt, so the job just
    # queued belongs to no row and is cancelled.
    if ClusterJob.objects.filter(id=job.id, slurm_job_id=submitted.job_id).exists():
        logger.info("job #%s: a late sbatch answer for %s, already adopted by tag", job.id, claim.tag)
        return True
    report.errors.append(
        f"job #{job.id}: claim {claim.tag} was superseded while sbatch ran; "
        f"cancelled the Slurm job {submitted.job_id} it queued"
    )
    reconciler.cluster.cancel(submitted.job_id)
    return False


def backoff(job: ClusterJob) -> timedelta:
    errors_in_a_row = 0
    for entry in reversed(job.history):
        if entry.get("state") == jobs.SUBMIT_ERROR:
            errors_in_a_row += 1
        elif entry.get("state") != jobs.CLAIMED:
            break
    return min(FIRST_BACKOFF * (2**errors_in_a_row), MAX_BACKOFF)
