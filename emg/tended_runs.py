"""Every change of a TendedRun: tracked when its flow run is made, re-run, ended.

The reconciler (workers.reconcile.flow_runs) re-runs a tended run that crashed or fell silent
only if its re-run count update applied here (`UPDATE ... WHERE id = ? AND reruns = <read>
AND ended_at IS NULL`): two ticks that both saw it crash re-run it once. Nothing else writes these
columns (tests/test_transition_owners.py checks).
"""

import logging
from uuid import UUID

from django.db.models import F, QuerySet
from django.utils import timezone

from emg.history import HistoryEntry, apply_transition
from emg.history import entry as _entry
from emg.models import TendedRun

logger = logging.getLogger(__name__)
RUNNING = "RUNNING"
ENDED = "ENDED"


def _apply(rows: QuerySet[TendedRun], run: TendedRun, step: str, entry: HistoryEntry, **changes) -> bool:
    return apply_transition(rows, f"tended flow run {run.flow_run_id}", step, entry, logger, **changes)


def track(flow_run_id: UUID, started_by: str) -> None:
    """Look after this flow run from now on; a run tracked already (a repeated dispatch) stays as it is."""
    TendedRun.objects.bulk_create(
        [TendedRun(flow_run_id=flow_run_id, started_by=started_by[:300])], ignore_conflicts=True
    )


def count_rerun(run: TendedRun, why: str) -> bool:
    """Take one re-run; only the tick whose update applied re-runs the flow."""
    rows = TendedRun.objects.filter(id=run.id, reruns=run.reruns, ended_at__isnull=True)
    return _apply(rows, run, "count_rerun", _entry(RUNNING, f"re-run {run.reruns + 1}: {why}"), reruns=F("reruns") + 1)


def end(run: TendedRun, outcome: str) -> bool:
    """No longer looked after: the run ended (or is given up, or belongs to a request that ended)."""
    now = timezone.now()
    rows = TendedRun.objects.filter(id=run.id, ended_at__isnull=True)
    return _apply(rows, run, "end", _entry(ENDED, outcome, now), ended_at=now, outcome=outcome[:2000])
