import dataclasses
import json
import logging
import os
import socket
from datetime import timedelta

import redis
from celery import shared_task
from django.conf import settings
from django.db import close_old_connections
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone
from prefect.client.orchestration import get_client

from emg.models import AnalysisRequest, OutboxEvent, ReconcileTick
from emg.outbox import DISPATCH_TASK_NAME, publish, record_run_event
from workers.cluster import configured_cluster
from workers.dispatch import dispatch_event as dispatch
from workers.reconciler import Reconciler, TickReport

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
    """One reconciler tick, unless another is still running anywhere (the Redis lock says so)."""
    close_old_connections()
    try:
        report = run_tick()
    finally:
        close_old_connections()
    return None if report is None else report_summary(report)


def run_tick() -> TickReport | None:
    lock = redis.Redis.from_url(settings.REDIS_URL).lock(
        RECONCILE_LOCK_NAME, timeout=settings.EMG_RECONCILE_LOCK_SECONDS, blocking=False
    )
    if not lock.acquire():
        logger.info("a reconcile tick is already running; skipping this one")
        return None
    tick = ReconcileTick.objects.create(started_at=timezone.now(), worker=f"{socket.gethostname()}:{os.getpid()}")
    try:
        with get_client(sync_client=True) as prefect:
            report = Reconciler.from_settings(configured_cluster(), prefect).tick()
        ReconcileTick.objects.filter(id=tick.id).update(finished_at=timezone.now(), report=report_summary(report))
        ReconcileTick.objects.filter(id__lte=tick.id - ReconcileTick.KEEP).delete()
        return report
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            logger.error("the reconcile lock expired during a tick; raise EMG_RECONCILE_LOCK_SECONDS")


def report_summary(report: TickReport) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(report), default=str))


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
