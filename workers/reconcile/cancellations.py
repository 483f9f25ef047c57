"""Carrying out the cancellations operators asked for.

Per request, isolated from the others: its flow run is cancelled, each live job no other live
request waits for is cancelled (a declared job before it ever reaches Slurm; a claimed one only
after its tag was looked up, so a job whose sbatch answer was lost is not left running), its
waits are released, and the request ends CANCELLED if it is still what was read.
"""

import logging

from django.utils import timezone
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled

from emg import jobs, requests, waits
from emg.models import AnalysisRequest, ClusterJob, ClusterJobState, JobWait
from workers.reconcile.submissions import LookupFailed, adopt_by_tag, claim_is_stale

logger = logging.getLogger(__name__)


def cancel_requested(reconciler, report) -> None:
    for request in AnalysisRequest.objects.filter(cancel_requested_at__isnull=False).unfinished():
        try:
            cancel_request(reconciler, request, report)
        except Exception as error:  # one request's failure never stops the others' cancellation
            logger.exception("cancelling request #%s failed", request.id)
            report.errors.append(f"cancel request #{request.id}: {error}")


def cancel_request(reconciler, request: AnalysisRequest, report) -> None:
    if request.flow_run_id:
        try:
            reconciler.prefect.set_flow_run_state(request.flow_run_id, Cancelled(message="cancelled by an operator"),
                                                  force=True)
        except ObjectNotFound:
            logger.warning("request #%s: its flow run %s no longer exists in Prefect", request.id, request.flow_run_id)
    request_waits = list(JobWait.objects.filter(request=request).select_related("job"))
    settled = True
    for job in {wait.job for wait in request_waits if not wait.job.is_final}:
        if job_needed_elsewhere(job, request):
            logger.info("job %s is shared with a live request: left running", job.slurm_job_id or job.id)
            continue
        settled &= cancel_job(reconciler, job, report)
    if not settled:
        return  # a claimed job's answer may still come: the next tick looks again
    waits.release([wait.id for wait in request_waits])
    if requests.cancel(request, "cancelled by an operator"):
        report.cancelled.append(request.id)


def cancel_job(reconciler, job: ClusterJob, report) -> bool:
    """Stop one job; False while that cannot be decided yet (a fresh claim, a failed look-up)."""
    if job.slurm_job_id:
        reconciler.cluster.cancel(job.slurm_job_id)  # the next state refresh records CANCELLED
        return True
    if job.state != ClusterJobState.DECLARED:
        return True
    if job.submission_started_at is None:
        jobs.cancel_unsubmitted(job, "cancelled before submission")
        return True
    # Claimed: sbatch may have queued it although no answer was recorded. Adopt it, then cancel it.
    try:
        adopted = adopt_by_tag(reconciler, job, report)
    except LookupFailed:
        return False
    if adopted is not None:
        reconciler.cluster.cancel(adopted.job_id)
        return True
    if not claim_is_stale(job, timezone.now(), reconciler.claim_lease):
        return False
    # Not in Slurm, and its sbatch has returned: a late answer finds its claim gone and cancels its job.
    if jobs.cancel_unsubmitted(job, "cancelled before submission (its claimed attempt never reached Slurm)"):
        report.claims_superseded += 1
    return True


def job_needed_elsewhere(job: ClusterJob, cancelled: AnalysisRequest) -> bool:
    return (
        JobWait.objects.filter(job=job, request__isnull=False)
        .exclude(request=cancelled)
        .exclude(request__status__in=AnalysisRequest.FINAL_STATUSES)
        .filter(request__cancel_requested_at__isnull=True)
        .exists()
    )
