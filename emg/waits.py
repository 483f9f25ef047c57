"""Every change of a JobWait: opened by the flow that waits, released once its jobs have ended.

`released_at` is the wait's state. Releasing is conditional on the wait being open, so of two
ticks (or a tick and the flow itself) that see the same jobs end, one releases it; re-opening is
done only by the flow run that owns the wait, just before it suspends again.
"""

from uuid import UUID

from django.db.models import F, Max
from django.utils import timezone

from emg.models import JobWait


def attach(flow_run_id: UUID, step: str, job_id: int, request_id: int | None) -> JobWait:
    """The flow run's wait at `step`: the existing one, or a new one for this job."""
    wait, _ = JobWait.objects.get_or_create(flow_run_id=flow_run_id, step=step,
                                            defaults={"job_id": job_id, "request_id": request_id})
    return wait


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
