"""Every change of a JobWait: opened by the flow that waits, released once its jobs have ended.

`released_at` is the wait's state and `suspensions` its round. Like emg.jobs and emg.requests, each
change is a compare-and-set that appends its history entry in the same statement, and says whether
it applied: of two ticks (or a tick and the flow itself) that see the same jobs end, one releases
the wait and one "released" entry is written; of two processes of one flow run (one taken for a
zombie and re-run) that re-open it from the same read, one opens the round. Nothing else writes a
wait's `released_at`, `suspensions` or `history` (tests/test_transition_owners.py checks).
"""

from typing import Any, Literal
from uuid import UUID

from django.db import transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from emg.history import AppendToHistory, HistoryEntry
from emg.models import AnalysisRequest, ClusterJob, JobWait

OPENED = "opened"
RELEASED = "released"
REOPENED = "reopened"
# Who releases a wait: a reconciler tick (it resumed the run, or the run is gone) or the flow run
# itself (it found its jobs ended before suspending).
Releaser = Literal["tick", "flow"]


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
        opened = HistoryEntry(OPENED, f"waits at {step} for job #{job_id}", timezone.now())
        wait, _ = JobWait.objects.get_or_create(
            flow_run_id=flow_run_id,
            step=step,
            defaults={"job_id": job_id, "request_id": request_id, "history": [opened.to_json()]},
        )
        return wait


def live_waits(**filters: Any) -> "QuerySet[JobWait]":
    """Waits that still want their job: of a request that is unfinished and not being cancelled
    (released or not: its flow may re-run and wait again), or open waits of a flow with no request."""
    # `request__isnull=False` first: without it, a wait with no request matches the other two terms
    # (NULL is neither cancelled nor final), and a released wait of a flow with no request (a child
    # flow, cancelled) would keep its job wanted for ever.
    live_request = (
        Q(request__isnull=False)
        & Q(request__cancel_requested_at__isnull=True)
        & ~Q(request__status__in=AnalysisRequest.FINAL_STATUSES)
    )
    no_request = Q(request__isnull=True, released_at__isnull=True)
    return JobWait.objects.filter(live_request | no_request, **filters)


def job_is_wanted(job_id: int) -> bool:
    return live_waits(job_id=job_id).exists()


def _release(rows: "QuerySet[JobWait]", by: Releaser, why: str) -> int:
    now = timezone.now()
    entry = HistoryEntry(RELEASED, f"by the {by}: {why}", now)
    released: int = rows.filter(released_at__isnull=True).update(released_at=now, history=AppendToHistory(entry))
    return released


def release(wait_ids: list[int], by: Releaser, why: str) -> int:
    """Release the open waits among these; how many this call released (a wait released meanwhile
    is left as it is, its history unchanged)."""
    return _release(JobWait.objects.filter(id__in=wait_ids), by, why)


def release_for_run(flow_run_id: UUID, job_ids: list[int], by: Releaser, why: str) -> int:
    """Release the run's open waits for these jobs; how many this call released."""
    return _release(JobWait.objects.filter(flow_run_id=flow_run_id, job_id__in=job_ids), by, why)


def rounds_read(flow_run_id: UUID, job_ids: list[int]) -> dict[int, int]:
    """The run's waits for these jobs as they are now, each wait's id to its suspension count:
    what `open_round` is given, and guarded on."""
    rows = JobWait.objects.filter(flow_run_id=flow_run_id, job_id__in=job_ids).values_list("id", "suspensions")
    return dict(rows)


def open_round(read: dict[int, int]) -> int | None:
    """Open the waits read (`rounds_read`) for one more suspension, all of them or none: the round's
    number, or None if any has been re-opened since it was read (by another process of the same
    flow run), and the caller must read again. A released wait is opened again: the flow re-runs
    from the top on every resume, and may have to wait once more."""
    if not read:
        raise ValueError("no wait to open: a flow waits only for jobs it required (flows.cluster_jobs.require_job)")
    round_number = max(read.values()) + 1
    entry = HistoryEntry(REOPENED, f"round {round_number}", timezone.now())
    as_read = Q()
    for wait_id, suspensions in read.items():
        as_read |= Q(id=wait_id, suspensions=suspensions)
    with transaction.atomic():
        opened: int = JobWait.objects.filter(as_read).update(
            suspensions=F("suspensions") + 1, released_at=None, history=AppendToHistory(entry)
        )
        if opened != len(read):
            # Part of the read moved on: the rows that did not are left as they were, not half-opened.
            transaction.set_rollback(True)
            return None
    return round_number
