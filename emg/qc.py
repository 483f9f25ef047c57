"""A study's raw-reads QC (StudyQC) moves from in progress to finished or failed here only, once.

Each transition is a compare-and-set on `finished_at IS NULL`: a flow run re-run from the top, or
two processes of one run (a zombie and its re-run), record the outcome once, and whichever comes
second is told so (False) instead of overwriting it.
"""

import logging
import uuid

from django.db import transaction
from django.utils import timezone

from emg.models import RunQC, Study, StudyQC

logger = logging.getLogger(__name__)


def begin(study: Study, flow_run_id: uuid.UUID, run_accessions: list[str]) -> StudyQC:
    """This flow run's QC of `study`: made with the runs it covers, or found again as first made."""
    qc, created = StudyQC.objects.get_or_create(
        study=study, flow_run_id=flow_run_id, defaults={"run_accessions": sorted(run_accessions)}
    )
    if not created and qc.run_accessions != sorted(run_accessions):
        logger.info("QC #%s of %s keeps the runs of its first fetch, %s", qc.id, study, qc.run_accessions)
    return qc


@transaction.atomic
def finish(qc: StudyQC, run_results: list[RunQC], summary: dict) -> bool:
    """Record every run's QC and the study's totals; False if this QC had ended already."""
    applied = StudyQC.objects.filter(id=qc.id, finished_at__isnull=True).update(
        finished_at=timezone.now(),
        runs_passed=sum(1 for result in run_results if result.passed),
        total_reads=sum(result.reads for result in run_results),
        total_bases=sum(result.bases for result in run_results),
        summary=summary,
    )
    if not applied:
        return False
    RunQC.objects.bulk_create(run_results)
    return True


def fail(qc: StudyQC, reason: str) -> bool:
    """End this QC as failed (a job that produced nothing, say), the reason its summary's "error";
    False if it had ended already."""
    return bool(
        StudyQC.objects.filter(id=qc.id, finished_at__isnull=True).update(
            finished_at=timezone.now(), summary={"error": reason[:4000]}
        )
    )
