"""Deleting the history no tick reads any more, so the tables stay the size of the live work.

A wait released, or a run event dispatched, is kept while its request may still need it: a re-run
of an unfinished request's flow finds its jobs through its waits, and the outbox sweep re-creates
the event of an unfinished generation that has none. Once the request has ended (for an event, or
moved on to a later generation) and EMG_PRUNE_AFTER_DAYS have passed, the row goes, at most
EMG_PRUNE_BATCH of each kind per tick. Cluster jobs are never pruned: they are the record of what
produced a result. Reconcile ticks keep their own window (ReconcileTick.KEEP, deleted by the tick
that writes one).
"""

import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from emg.models import AnalysisRequest, JobWait, OutboxEvent

logger = logging.getLogger(__name__)


def prune_history(reconciler, report) -> None:
    if settings.EMG_PRUNE_AFTER_DAYS <= 0:
        return
    cutoff = timezone.now() - timedelta(days=settings.EMG_PRUNE_AFTER_DAYS)
    done_with = Q(request__isnull=True) | Q(request__status__in=AnalysisRequest.FINAL_STATUSES)
    waits = JobWait.objects.filter(done_with, released_at__lt=cutoff)
    events = OutboxEvent.objects.filter(
        Q(request__status__in=AnalysisRequest.FINAL_STATUSES) | Q(request__generation__gt=F("generation")),
        dispatched_at__lt=cutoff,
    )
    for name, rows in (("waits", waits), ("events", events)):
        deleted = delete_a_batch(rows)
        if deleted:
            report.pruned[name] = deleted
            logger.info("pruned %s %s older than %s days", deleted, name, settings.EMG_PRUNE_AFTER_DAYS)


def delete_a_batch(rows: QuerySet[Any]) -> int:
    batch = rows.order_by().values("id")[: settings.EMG_PRUNE_BATCH]
    deleted, _ = rows.model.objects.filter(id__in=batch).delete()
    return deleted
