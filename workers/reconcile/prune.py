"""Deleting the history no tick reads any more, so the tables stay the size of the live work.

A wait released, or a run event dispatched, is kept while its request may still need it: a re-run
of an unfinished request's flow finds its jobs through its waits, and the outbox sweep re-creates
the event of an unfinished generation that has none. Once the request has ended (for an event,
once its trigger says it is history: an analysis request's, ended or moved on to a later
generation) and EMG_PRUNE_AFTER_DAYS have passed, the row goes, at most EMG_PRUNE_BATCH of each
kind per tick. A tended run (emg.tended_runs) goes as long after it ended, and a child run as long
after its parent stopped waiting for it (released) once it has ended too. Cluster jobs are never
pruned: they are the record of what produced a result.
Reconcile ticks keep their own window (ReconcileTick.KEEP, deleted by the tick that writes one).
"""

import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import Q, QuerySet
from django.utils import timezone

from emg import triggers
from emg.models import FINAL_CHILD_STATES, AnalysisRequest, ChildRun, JobWait, OutboxEvent, TendedRun

logger = logging.getLogger(__name__)


def prune_history(reconciler, report) -> None:
    if settings.EMG_PRUNE_AFTER_DAYS <= 0:
        return
    cutoff = timezone.now() - timedelta(days=settings.EMG_PRUNE_AFTER_DAYS)
    done_with = Q(request__isnull=True) | Q(request__status__in=AnalysisRequest.FINAL_STATUSES)
    waits = JobWait.objects.filter(done_with, released_at__lt=cutoff)
    # Each trigger says which of its events are history (emg.triggers.Trigger.prunable); the
    # events of one that does not are kept.
    history = Q(pk__in=[])
    for trigger in triggers.all_triggers():
        if trigger.prunable is not None:
            history |= Q(trigger=trigger.name) & trigger.prunable
    events = OutboxEvent.objects.filter(history, dispatched_at__lt=cutoff)
    tended = TendedRun.objects.filter(ended_at__lt=cutoff)
    children = ChildRun.objects.filter(state__in=FINAL_CHILD_STATES, ended_at__lt=cutoff, released_at__lt=cutoff)
    for name, rows in (("waits", waits), ("events", events), ("tended runs", tended), ("child runs", children)):
        deleted = delete_a_batch(rows)
        if deleted:
            report.pruned[name] = deleted
            logger.info("pruned %s %s older than %s days", deleted, name, settings.EMG_PRUNE_AFTER_DAYS)


def delete_a_batch(rows: QuerySet[Any]) -> int:
    batch = rows.order_by().values("id")[: settings.EMG_PRUNE_BATCH]
    deleted, _ = rows.model.objects.filter(id__in=batch).delete()
    return deleted
