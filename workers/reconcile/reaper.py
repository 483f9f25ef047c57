"""Stopping work no one waits for any more: the jobs of cancelled, failed or ended requests.

Cancellation is by state, not by event: however a request ended (cancelled by an operator, in
Prefect's UI, failed after its last re-run), the next tick finds each live job that has waiters
but no live one, and, where the job's policy allows (`ResubmitPolicy.cancel_when_unwanted`),
gives it up (emg.jobs.give_up, serialised with flows attaching to it). Then every job given up
and still live is stopped, whatever state it is in:
- declared and unclaimed: cancelled before Slurm ever sees it (give_up does this itself);
- claimed, its sbatch answer not recorded: looked up by its tag first (adopted and cancelled if
  Slurm queued it); not found once its claim is stale, cancelled (a late answer cancels its own job);
- submitted, pending or running: `scancel`, every tick until Slurm reports it ended.
A job another live request waits for is never given up: it keeps running for that request.
"""

import logging

from django.db.models import Exists, OuterRef
from django.utils import timezone

from emg import jobs, waits
from emg.models import ClusterJob, ClusterJobState, JobWait
from emg.policies import ResubmitPolicy
from workers.reconcile.submissions import LookupFailed, adopt_by_tag, claim_is_stale

logger = logging.getLogger(__name__)

UNWANTED = "no live request waits for it any more"


def reap_unwanted_jobs(reconciler, report) -> None:
    unwanted = (
        ClusterJob.objects.wanted()
        .filter(Exists(JobWait.objects.filter(job=OuterRef("pk"))))
        .exclude(Exists(waits.live_waits(job=OuterRef("pk"))))
    )
    for job in unwanted:
        if not ResubmitPolicy.from_dict(job.policy).cancel_when_unwanted:
            continue
        try:
            if jobs.give_up(job, UNWANTED):
                logger.info("cluster job #%s (%s): %s; stopping it", job.id, job.name, UNWANTED)
                report.given_up.append(job.id)
        except Exception as error:  # one job's failure never stops the others
            logger.exception("giving up cluster job #%s failed", job.id)
            report.errors.append(f"give up job #{job.id}: {error}")
    for job in ClusterJob.objects.live().filter(cancel_requested_at__isnull=False):
        try:
            stop(reconciler, job, report)
        except Exception as error:
            logger.exception("stopping cluster job #%s failed", job.id)
            report.errors.append(f"stop job #{job.id} (Slurm {job.slurm_job_id or 'none'}): {error}")


def stop(reconciler, job: ClusterJob, report) -> None:
    """One step towards the given-up job's end; the state refresh records it once Slurm has."""
    if job.slurm_job_id:
        reconciler.cluster.cancel(job.slurm_job_id)
        return
    if job.state != ClusterJobState.DECLARED:
        return
    if job.submission_started_at is None:
        jobs.cancel_unsubmitted(job, f"cancelled before submission: {UNWANTED}")
        return
    # Claimed: sbatch may have queued it although no answer was recorded. Adopt it, then cancel it.
    try:
        adopted = adopt_by_tag(reconciler, job, report)
    except LookupFailed:
        return  # decided on a later tick
    if adopted is not None:
        reconciler.cluster.cancel(adopted.job_id)
        return
    if claim_is_stale(job, timezone.now(), reconciler.claim_lease):
        # Not in Slurm, and its sbatch has returned: a late answer finds its claim gone and cancels its job.
        if jobs.cancel_unsubmitted(
            job, f"cancelled before submission (its claimed attempt never reached Slurm): {UNWANTED}"
        ):
            report.claims_superseded += 1
