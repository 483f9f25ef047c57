"""Every change of a JobWait: opened by the flow that waits, released once its jobs have ended.

`released_at` is the wait's state. Releasing is conditional on the wait being open, so of two
ticks (or a tick and the flow itself) that see the same jobs end, one releases it; re-opening is
done only by the flow run that owns the wait, just before it suspends again.
"""

from typing import Any
from uuid import UUID

from django.db import transaction
from django.db.models import F, Max, Q, QuerySet
from django.utils import timezone

from emg.models import AnalysisRequest, ClusterJob, JobWait


def attach(flow_run_id: UUID, step: str, job_id: int, request_id: int | None) -> JobWait | None:
    """The flow run's wait at `step`: the existing one, or a new one for this job; None if the job
    was given up meanwhile (emg.jobs.give_up), and the flow must declare its work again.

    Takes the job's row lock first, as give_up does: of the two, the later sees the earlier's effect.
    """
    with transaction.atomic():
        existing = JobWait.objects.filter(flow_run_id=flow_run_id, step=step).first()
        if existing is not None:
            return existing
        job = ClusterJob.objects.select_for_update().filter(id=job_id).first()
        if job is None or job.cancel_requested_at is not None:
            return None
        wait, _ = JobWait.objects.get_or_create(
            flow_run_id=flow_run_id, step=step, defaults={"job_id": job_id, "request_id": request_id}
        )
        return wait


def live_waits(**filters: Any) -> "QuerySet[JobWait]":
    """Waits that still want their job: of a request that is unfinished and not being cancelled
    (released or not: its flow may re-run and wait again), or open waits of a flow with no request."""
    live_request = Q(request__cancel_requested_at__isnull=True) & ~Q(request__status__in=AnalysisRequest.FINAL_STATUSES)
    no_request = Q(request__isnull=True, released_at__isnull=True)
    return JobWait.objects.filter(live_request | no_request, **filters)


def job_is_wanted(job_id: int) -> bool:
    return live_waits(job_id=job_id).exists()


def release(wait_ids: list[int]) -> int:
    """Release the open waits among these; how many this call released."""
    return JobWait.objects.filter(id__in=wait_ids, released_at__isnull=True).update(released_at=timezone.now())


def release_for_run(flow_run_id: UUID, job_ids: list[int]) -> int:
    return JobWait.objects.filter(flow_run_id=flow_run_id, job_id__in=job_ids, released_at__isnull=True).update(
        released_at=timezone.now()
    )


def open_round(flow_run_id: UUID, job_ids: list[int]) -> int:
    """Open the run's waits for these jobs for one more suspension; the round's number."""
    waits = JobWait.objects.filter(flow_run_id=flow_run_id, job_id__in=job_ids)
    waits.update(suspensions=F("suspensions") + 1, released_at=None)
    round_number: int = waits.aggregate(round=Max("suspensions"))["round"]
    return round_number
