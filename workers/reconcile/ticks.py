"""One tick under the lock, recorded in ReconcileTick for operators (and to show ticks never overlap)."""

import dataclasses
import json
import logging

from django.utils import timezone
from prefect.client.orchestration import get_client

from emg.models import ReconcileTick
from workers.cluster import configured_cluster
from workers.reconcile.lock import TickLock, process_label

logger = logging.getLogger(__name__)


def run_tick():
    """One reconciler tick, unless another is still running anywhere; its report, or None if skipped."""
    from workers.reconciler import Reconciler

    lock = TickLock()
    if not lock.acquire():
        logger.info("a reconcile tick is already running; skipping this one")
        return None
    with lock:
        tick = ReconcileTick.objects.create(started_at=timezone.now(), worker=process_label())
        with get_client(sync_client=True) as prefect:
            report = Reconciler.from_settings(configured_cluster(), prefect, lock=lock).tick()
        ReconcileTick.objects.filter(id=tick.id).update(finished_at=timezone.now(), report=report_summary(report))
        ReconcileTick.objects.filter(id__lte=tick.id - ReconcileTick.KEEP).delete()
        return report


def report_summary(report) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(report), default=str))
