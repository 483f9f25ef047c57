import logging
from datetime import timedelta

import redis
from celery import shared_task
from django.conf import settings
from django.db import close_old_connections
from django.db.models import Q
from django.utils import timezone
from prefect.client.orchestration import get_client

from emg.models import OutboxEvent
from emg.outbox import DISPATCH_TASK_NAME, publish
from workers.cluster import configured_cluster
from workers.dispatch import dispatch_event as dispatch
from workers.reconciler import Reconciler

logger = logging.getLogger(__name__)

RECONCILE_LOCK_NAME = "emg:reconcile:lock"


@shared_task(name=DISPATCH_TASK_NAME, autoretry_for=(Exception,), retry_backoff=2, retry_backoff_max=60,
             max_retries=None)
def dispatch_event(event_id: str) -> str | None:
    close_old_connections()
    flow_run_id = dispatch(event_id)
    return str(flow_run_id) if flow_run_id else None


@shared_task(name="workers.tasks.reconcile", acks_late=False)
def reconcile() -> dict | None:
    """One reconciler tick, unless another is still running (the Redis lock says so)."""
    lock = redis.Redis.from_url(settings.REDIS_URL).lock(
        RECONCILE_LOCK_NAME, timeout=settings.EMG_RECONCILE_LOCK_SECONDS, blocking=False
    )
    if not lock.acquire():
        logger.info("a reconcile tick is already running; skipping this one")
        return None
    close_old_connections()
    try:
        with get_client(sync_client=True) as prefect:
            reconciler = Reconciler(
                configured_cluster(),
                prefect,
                max_active_jobs=settings.EMG_MAX_ACTIVE_JOBS,
                resumes_per_tick=settings.EMG_RESUMES_PER_TICK,
            )
            report = reconciler.tick()
    finally:
        close_old_connections()
        try:
            lock.release()
        except redis.exceptions.LockError:
            logger.warning("the reconcile lock expired during the tick; raise EMG_RECONCILE_LOCK_SECONDS")
    return {"submitted": report.submitted, "resumed": [str(r) for r in report.resumed], "errors": report.errors}


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
    if count:
        logger.info("re-published %s undispatched events", count)
    return count
