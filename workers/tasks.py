import logging
from datetime import timedelta

from celery import Task, shared_task
from django.conf import settings
from django.db import close_old_connections
from django.db.models import Q
from django.utils import timezone

from emg import triggers
from emg.models import OutboxEvent
from emg.outbox import DISPATCH_TASK_NAME, forget_lost_in_flight, publish, record, settle
from workers.dispatch import dispatch_event as dispatch
from workers.reconcile.ticks import report_summary, run_tick

logger = logging.getLogger(__name__)


class DispatchTask(Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        """Out of retries: the event goes back to the outbox sweep, the retry of last resort."""
        event_id = args[0] if args else kwargs.get("event_id")
        logger.warning(
            "event %s: dispatch gave up after %s retries (%s); the outbox sweep will publish it again",
            event_id,
            self.max_retries,
            exc,
        )
        try:
            OutboxEvent.objects.filter(id=event_id).update(last_error=f"dispatch failed: {exc}"[:2000])
            settle(event_id)
        except Exception:
            logger.exception("event %s: could not record the failed dispatch", event_id)


# Bounded: during an outage (Prefect down) a chain of retries per event would otherwise live for
# ever, and every sweep would add one more.
@shared_task(
    base=DispatchTask,
    name=DISPATCH_TASK_NAME,
    autoretry_for=(Exception,),
    retry_backoff=2,
    retry_backoff_max=60,
    max_retries=settings.EMG_DISPATCH_MAX_RETRIES,
)
def dispatch_event(event_id: str) -> str | None:
    close_old_connections()
    flow_run_id = dispatch(event_id)
    settle(event_id)
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
    """Publish again every event not dispatched within the grace period and with no task in flight.

    So the broker never holds more dispatch tasks than there are undispatched events, however long
    Prefect is down or the queue is backed up.
    """
    close_old_connections()
    cutoff = timezone.now() - timedelta(seconds=settings.EMG_OUTBOX_GRACE_SECONDS)
    stale = OutboxEvent.objects.filter(dispatched_at__isnull=True).filter(
        Q(published_at__isnull=True, created_at__lt=cutoff) | Q(published_at__lt=cutoff)
    )
    count = 0
    try:
        forget_lost_in_flight()
    except Exception as error:  # the broker is down: publishing fails too, and says so
        logger.warning("cannot read which events are in flight (%s)", error)
    for event_id in stale.values_list("id", flat=True)[:500]:
        count += publish(event_id, unless_in_flight=True)
    # Rows saved without their event (bulk_create, a raw UPDATE) still run, for each trigger that
    # says which they are.
    for trigger in triggers.all_triggers():
        if trigger.missing is None:
            continue
        for instance in list(trigger.missing(cutoff)[:500]):
            event = record(trigger, instance)
            if event is not None:
                logger.warning(
                    "%s #%s had no %s event for run %s; created one",
                    instance._meta.label,
                    instance.pk,
                    trigger.name,
                    event.run_key,
                )
                count += publish(event.id)
    if count:
        logger.info("published %s undispatched events", count)
    return count
