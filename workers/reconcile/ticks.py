"""One tick under the lock, recorded in ReconcileTick for operators (and to show ticks never overlap).

Besides what the tick did, its row keeps how long it took, the Slurm commands it ran, and running
totals carried over from the previous tick's row: /metrics serves those totals as counters, read
from the database like every other metric, so they survive a worker's restart.
"""

import dataclasses
import json
import logging
import time
from collections import Counter

from django.utils import timezone
from prefect.client.orchestration import get_client

from emg.connections import once_more_if_disconnected
from emg.models import ReconcileTick
from workers.cluster import configured_cluster
from workers.reconcile.lock import TickLock, process_label

logger = logging.getLogger(__name__)

# What each tick adds to the running totals: the name in `totals`, and how it is read off the report.
TOTALS = {
    "ticks": lambda report: 1,
    "submitted": lambda report: len(report.submitted) + len(report.adopted),
    "rejected": lambda report: len(report.rejected),
    "retried": lambda report: len(report.retried),
    "resumed": lambda report: len(report.resumed),
    "rerun": lambda report: len(report.rerun),
    "errors": lambda report: len(report.errors),
}


def run_tick():
    """One reconciler tick, unless another is still running anywhere; its report, or None if skipped."""
    from workers.reconciler import Reconciler

    lock = TickLock()
    if not lock.acquire():
        logger.info("a reconcile tick is already running; skipping this one")
        return None
    with lock:
        # Creating and finishing the tick row are repeated if a restart cuts them off: the tick's
        # steps already record their own errors, and its bookkeeping must not fail the task.
        # (A create repeated after the server had committed it leaves one row never finished.)
        tick = once_more_if_disconnected(
            lambda: ReconcileTick.objects.create(started_at=timezone.now(), worker=process_label()),
            what="starting a reconcile tick",
        )
        cluster = configured_cluster()
        calls_before = slurm_calls(cluster)
        started = time.monotonic()
        with get_client(sync_client=True) as prefect:
            report = Reconciler.from_settings(cluster, prefect, lock=lock).tick()
        duration = time.monotonic() - started
        calls = slurm_calls(cluster) - calls_before

        def finish() -> None:
            summary = {
                **report_summary(report),
                "duration_seconds": round(duration, 3),
                "slurm_calls": dict(calls),
                "totals": running_totals(previous_totals(tick.id), report, calls),
            }
            ReconcileTick.objects.filter(id=tick.id).update(
                finished_at=timezone.now(), report=summary, job_states_read_at=report.job_states_read_at
            )
            ReconcileTick.objects.filter(id__lte=tick.id - ReconcileTick.KEEP).delete()

        once_more_if_disconnected(finish, what=f"finishing reconcile tick #{tick.id}")
        return report


def slurm_calls(cluster) -> Counter:
    """Slurm commands the cluster client has run, by command (none for the local backend)."""
    return Counter(getattr(cluster, "calls", None) or {})


def previous_totals(tick_id: int) -> dict:
    """The running totals of the last tick that finished before this one (ticks never overlap)."""
    report = (
        ReconcileTick.objects.filter(id__lt=tick_id, finished_at__isnull=False)
        .order_by("-id")
        .values_list("report", flat=True)
        .first()
    )
    totals = report.get("totals") if isinstance(report, dict) else None
    return totals if isinstance(totals, dict) else {}


def running_totals(previous: dict, report, calls: Counter) -> dict:
    totals: dict[str, object] = {name: int(previous.get(name, 0)) + count(report) for name, count in TOTALS.items()}
    slurm = Counter({command: int(n) for command, n in (previous.get("slurm_calls") or {}).items()})
    slurm.update(calls)
    totals["slurm_calls"] = dict(slurm)
    return totals


def report_summary(report) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(report), default=str))
