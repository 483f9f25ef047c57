import logging
from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.db import close_old_connections
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from emg.models import AnalysisRequest, OutboxEvent
from emg.outbox import DISPATCH_TASK_NAME, publish, record_run_event
from workers.dispatch import dispatch_event as dispatch
from workers.reconcile.ticks import report_summary, run_tick

logger = logging.getLogger(__name__)


@shared_task(name=DISPATCH_TASK_NAME, autoretry_for=(Exception,), retry_backoff=2, retry_backoff_max=60,
             max_retries=None)
def dispatch_event(event_id: str) -> str | None:
    close_old_connections()
    flow_run_id = dispatch(event_id)
    return str(flow_run_id) if flow_run_id else None


@shared_task(name="workers.tasks.reconcile", acks_late=False)
def reconcile() -> dict | None:
    """One reconciler tick, unless another is still running anywhere (see workers.reconcile.lock)."""
    close_old_connections()
    try:
        report = run_tick()
    finally:
        close_old_connections()
    return None if report is None else report_summary(report)


@shared_task(name="workers.tasks.sweep_outbox", acks_late=False)
def sweep_outbox() -> int:
    """Publish again every event not dispatched within the grace period."""
    close_old_connections()
    cutoff = timezone.now() - timedelta(seconds=settings.EMG_OUTBOX_GRACE_SECONDS)
    stale = OutboxEvent.objects.filter(dispatched_at__isnull=True).filter(
        Q(published_at__isnull=True, created_at__lt=cutoff) | Q(published_at__lt=cutoff)
    )
    count = 0
    for event_id in stale.values_list("id", flat=True)[:500]:
        count += publish(event_id)
    # A request saved without its event (bulk_create, a raw update of its generation) still runs.
    without_event = AnalysisRequest.objects.unfinished().filter(created_at__lt=cutoff).exclude(
        Exists(OutboxEvent.objects.filter(request=OuterRef("pk"), generation=OuterRef("generation")))
    )
    for request in without_event[:500]:
        event = record_run_event(request)
        if event is not None:
            logger.warning("request #%s had no run event for generation %s; created one", request.id,
                           request.generation)
            count += publish(event.id)
    if count:
        logger.info("published %s undispatched events", count)
    return count
