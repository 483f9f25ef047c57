"""Turning a run event into exactly one Prefect flow run."""

import logging
import uuid
from typing import cast

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

from emg import requests
from emg.models import AnalysisRequest, OutboxEvent
from flows.deployments import ANALYSIS_DEPLOYMENT

logger = logging.getLogger(__name__)


def idempotency_key(event: OutboxEvent) -> str:
    """Same request and generation, same key: Prefect returns the run it already made."""
    return f"{settings.EMG_INSTANCE_NAMESPACE}:analysis-request:{event.request_id}:generation:{event.generation}"


def dispatch_event(event_id: uuid.UUID | str) -> uuid.UUID | None:
    """Create (or find) the flow run for an event and record it; safe to call any number of times."""
    event = OutboxEvent.objects.filter(id=event_id).first()
    if event is None:
        logger.warning("event %s does not exist (rolled back or deleted); nothing to dispatch", event_id)
        return None
    request = AnalysisRequest.objects.get(id=event.request_id)
    if event.dispatched_at is not None and request.flow_run_id is not None:
        return request.flow_run_id
    if request.generation != event.generation or request.status in AnalysisRequest.FINAL_STATUSES:
        logger.info("event %s is superseded (request #%s is at generation %s, %s)", event.id, request.id,
                    request.generation, request.status)
        with transaction.atomic():
            if request.generation == event.generation and request.flow_run_id is None:
                # A consumer that died after making the run, whose run then ended the request
                # before this redelivery: the run exists, and the request must still point to it.
                flow_run_id = existing_flow_run_id(event)
                if flow_run_id is not None:
                    requests.attach_flow_run(request.id, event.generation, flow_run_id)
            OutboxEvent.objects.filter(id=event.id).update(dispatched_at=timezone.now())
        return None

    flow_run = create_flow_run(request, event.generation, idempotency_key(event))
    with transaction.atomic():
        requests.attach_flow_run(request.id, event.generation, flow_run.id)
        OutboxEvent.objects.filter(id=event.id).update(dispatched_at=timezone.now(), last_error="")
    logger.info("request #%s generation %s -> flow run %s", request.id, event.generation, flow_run.id)
    return flow_run.id


def replacement_key(request: AnalysisRequest) -> str:
    """The key of the run replacing a generation's deleted flow run: one per re-run the request counted."""
    return (f"{settings.EMG_INSTANCE_NAMESPACE}:analysis-request:{request.id}:generation:{request.generation}"
            f":replacement:{request.flow_reruns}")


def create_flow_run(request: AnalysisRequest, generation: int, key: str) -> FlowRun:
    """The flow run of this key: made now, or the one Prefect already made for it."""
    # Called from sync code, run_deployment returns the FlowRun itself (not a coroutine).
    return cast(FlowRun, run_deployment(
        ANALYSIS_DEPLOYMENT,
        parameters={"request_id": request.id, "generation": generation},
        timeout=0,
        idempotency_key=key,
        flow_run_name=f"{request.study.accession}-request-{request.id}-gen-{generation}",
        tags=["emg", f"request-{request.id}"],
    ))


def flow_run_id_by_key(key: str) -> uuid.UUID | None:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=[key])), limit=1,
        )
    return runs[0].id if runs else None


def existing_flow_run_id(event: OutboxEvent) -> uuid.UUID | None:
    return flow_run_id_by_key(idempotency_key(event))
