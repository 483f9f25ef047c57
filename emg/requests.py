"""Every change of an AnalysisRequest's status, each one a compare-and-set.

Like emg.jobs: each function changes the row only if it is still what its caller read (status,
generation, re-run count), appends the history entry in the same statement, and returns whether
it applied; the caller acts (cancels a flow run, re-runs it) only when it did. Nothing else
writes a request's `status`, `generation`, `flow_run_id`, `flow_reruns`, `cancel_requested_at`,
`deferred_until` or `history` (tests/test_transition_owners.py checks).
"""

import logging
import uuid
from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from emg import triggers
from emg.history import HistoryEntry, apply_transition
from emg.models import AnalysisRequest

logger = logging.getLogger(__name__)

Status = AnalysisRequest.Status
UNFINISHED = (Status.PENDING, Status.RUNNING, Status.WAITING)


def _as_read(request: AnalysisRequest) -> QuerySet[AnalysisRequest]:
    return AnalysisRequest.objects.filter(
        id=request.id, status=request.status, generation=request.generation, flow_reruns=request.flow_reruns
    )


def _apply(
    rows: QuerySet[AnalysisRequest], request_id: int, step: str, entry: HistoryEntry | None, **changes: Any
) -> bool:
    return apply_transition(rows, f"request #{request_id}", step, entry, logger, **changes)


def _entry(status: str, detail: str, now: datetime) -> HistoryEntry:
    return HistoryEntry(status, detail[:2000], now)


# The analysis flow's steps in the order it takes them (flows/analysis.py; tests/test_models.py checks
# that it names no other). The flow re-runs from the top on every resume, passing the steps it
# already did on its way back to where it was: within a generation the step shown only moves forward.
STEPS = ("validating the request", "fetching from ENA", "assembly", "analysis", "data move")


def step_shown(current: str, reported: str) -> str:
    """The step a request shows when its flow reports `reported` while it shows `current`."""
    if current in STEPS and reported in STEPS and STEPS.index(reported) < STEPS.index(current):
        return current
    return reported


def advance(
    request_id: int, generation: int, status: str, *, step: str = "", reason: str = "", flow_reruns: int | None = None
) -> bool:
    """The flow run of `generation` reports progress (or its end). Applies only while that
    generation is the request's and the request is unfinished: a request cancelled, failed or
    re-run meanwhile stays as it is. Given `flow_reruns` (the count the flow process read when it
    started), it applies only while no re-run has been counted since: a process taken for a zombie
    and re-run reports nothing more. A step the generation has passed is not shown again (see
    STEPS): a resumed run re-doing its earlier steps reads as RUNNING at the step it had reached.
    A step change alone writes no history entry."""
    now = timezone.now()
    rows = AnalysisRequest.objects.filter(id=request_id, generation=generation, status__in=UNFINISHED)
    if flow_reruns is not None:
        rows = rows.filter(flow_reruns=flow_reruns)
    current = rows.values_list("status", "current_step").first()
    if current is None:
        logger.info("request #%s: advance to %s skipped, it has ended or moved on", request_id, status)
        return False
    shown = step_shown(current[1], step)
    entry = None if current[0] == status else _entry(status, f"{shown or reason}".strip(), now)
    finished_at = now if status in AnalysisRequest.FINAL_STATUSES else None
    return _apply(
        rows.filter(status=current[0], current_step=current[1]),
        request_id,
        f"advance to {status}",
        entry,
        status=status,
        current_step=shown,
        status_reason=reason[:10000],
        finished_at=finished_at,
    )


def cancel(request: AnalysisRequest, reason: str) -> bool:
    """End a request CANCELLED, if it is still what was read (a run that completed meanwhile stands)."""
    now = timezone.now()
    if request.status not in UNFINISHED:
        return False
    return _apply(
        _as_read(request),
        request.id,
        "cancel",
        _entry(Status.CANCELLED, reason, now),
        status=Status.CANCELLED,
        status_reason=reason,
        finished_at=now,
    )


def fail(request: AnalysisRequest, reason: str) -> bool:
    now = timezone.now()
    if request.status not in UNFINISHED:
        return False
    return _apply(
        _as_read(request),
        request.id,
        "fail",
        _entry(Status.FAILED, reason, now),
        status=Status.FAILED,
        status_reason=reason[:10000],
        finished_at=now,
    )


def count_rerun(request: AnalysisRequest, why: str) -> bool:
    """Take one of the request's flow re-runs; only the tick whose update applied re-runs the flow."""
    now = timezone.now()
    entry = _entry(request.status, f"flow run re-run {request.flow_reruns + 1}: {why}", now)
    return _apply(_as_read(request), request.id, "count_rerun", entry, flow_reruns=request.flow_reruns + 1)


def attach_flow_run(request_id: int, generation: int, flow_run_id: uuid.UUID) -> bool:
    """Record the generation's flow run, once."""
    return _apply(
        AnalysisRequest.objects.filter(id=request_id, generation=generation, flow_run_id__isnull=True),
        request_id,
        "attach_flow_run",
        None,
        flow_run_id=flow_run_id,
    )


def replace_flow_run(request_id: int, generation: int, old: uuid.UUID, new: uuid.UUID, why: str) -> bool:
    """The generation's flow run is gone (deleted from Prefect): record its replacement, once."""
    rows = AnalysisRequest.objects.filter(id=request_id, generation=generation, flow_run_id=old, status__in=UNFINISHED)
    current = rows.values_list("status", flat=True).first()
    if current is None:
        return False
    entry = _entry(current, f"flow run {old} replaced by {new}: {why}", timezone.now())
    return _apply(rows, request_id, "replace_flow_run", entry, flow_run_id=new)


def record_ena_fetch(request_id: int, generation: int, run_accessions: list[str]) -> bool:
    """What this generation fetched from ENA is stored: its resumes read it instead of asking again."""
    return _apply(
        AnalysisRequest.objects.filter(id=request_id, generation=generation),
        request_id,
        "record_ena_fetch",
        None,
        ena_fetched_generation=generation,
        ena_fetched_at=timezone.now(),
        ena_runs=run_accessions,
    )


def defer(request_id: int, generation: int, until: datetime, why: str) -> bool:
    """The generation's flow run asks to be run again at `until` (it is about to end): the request
    WAITS meanwhile, and the reconciler schedules the run (`take_deferral`) without counting a re-run."""
    now = timezone.now()
    rows = AnalysisRequest.objects.filter(
        id=request_id, generation=generation, status__in=UNFINISHED, deferred_until__isnull=True
    )
    current = rows.values_list("deferrals", flat=True).first()
    if current is None:
        logger.info("request #%s: deferral skipped, it has ended, moved on or is deferred already", request_id)
        return False
    detail = f"deferral {current + 1}, until {until.isoformat(timespec='seconds')}: {why}"
    return _apply(
        rows.filter(deferrals=current),
        request_id,
        "defer",
        _entry(Status.WAITING, detail, now),
        status=Status.WAITING,
        status_reason=why[:10000],
        deferred_until=until,
        deferrals=current + 1,
    )


def take_deferral(request: AnalysisRequest) -> bool:
    """The reconciler takes the deferral it read; only the tick whose update applied schedules the run."""
    if request.deferred_until is None:
        return False
    return _apply(
        _as_read(request).filter(deferred_until=request.deferred_until),
        request.id,
        "take_deferral",
        None,
        deferred_until=None,
    )


def superseded(request: AnalysisRequest) -> bool:
    """Whether a re-run of this generation was counted after `request` was read: the flow process
    that read it has been replaced (it was taken for a zombie) and must stop without a word."""
    return AnalysisRequest.objects.filter(
        id=request.id, generation=request.generation, flow_reruns__gt=request.flow_reruns
    ).exists()


def request_cancel(request: AnalysisRequest) -> bool:
    """Ask the reconciler to cancel this request; False if it has already ended or was asked before."""
    rows = AnalysisRequest.objects.filter(id=request.id, cancel_requested_at__isnull=True, status__in=UNFINISHED)
    now = timezone.now()
    return _apply(
        rows, request.id, "request_cancel", _entry(request.status, "cancel requested", now), cancel_requested_at=now
    )


def rerun(request: AnalysisRequest) -> None:
    """Start the next generation of an ended request: a new event in the same transaction, so a new flow run."""
    if request.status in UNFINISHED:
        raise ValidationError(f"request #{request.id} is still {request.status}; only an ended request can be re-run")
    now = timezone.now()
    with transaction.atomic():
        applied = _apply(
            AnalysisRequest.objects.filter(id=request.id, status=request.status, generation=request.generation),
            request.id,
            "rerun",
            _entry(Status.PENDING, f"re-run as generation {request.generation + 1}", now),
            generation=request.generation + 1,
            status=Status.PENDING,
            status_reason="",
            current_step="",
            flow_run_id=None,
            finished_at=None,
            cancel_requested_at=None,
            flow_reruns=0,
            deferred_until=None,
            deferrals=0,
        )
        if not applied:
            raise ValidationError(f"request #{request.id} changed meanwhile; look again before re-running it")
        request.refresh_from_db()
        # Changed by an UPDATE, which sends no post_save: its triggers are told as a save would.
        triggers.saved(request)
