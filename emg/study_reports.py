"""A StudyReport's columns move here only, each once, by compare-and-set on its being unset.

The flow (flows.process_study) re-runs from the top at every resume, and two processes of one run
may overlap (a zombie and its re-run): the first to set a column wins, the others read what it set.
"""

import uuid

from django.db import transaction
from django.utils import timezone

from emg.models import AnalysisRequest, StudyQC, StudyReport


def attach_flow_run(report_id: int, flow_run_id: uuid.UUID) -> bool:
    return bool(StudyReport.objects.filter(id=report_id, flow_run_id__isnull=True).update(flow_run_id=flow_run_id))


def request_of(report: StudyReport) -> AnalysisRequest:
    """The analysis request of this report: made by the first pass, in one transaction with its
    record here (its save writes the request's trigger event too), found again by every later one."""
    with transaction.atomic():
        locked = StudyReport.objects.select_for_update().get(id=report.id)
        if locked.request_id is None:
            request = AnalysisRequest.objects.create(study_id=locked.study_id)
            StudyReport.objects.filter(id=report.id, request__isnull=True).update(request=request)
        return AnalysisRequest.objects.select_related("study").get(study_report__id=report.id)


def finish(report: StudyReport, qc: StudyQC | None, summary: dict) -> bool:
    """The report, written once both children have ended; False if it had been written already."""
    return bool(
        StudyReport.objects.filter(id=report.id, finished_at__isnull=True).update(
            qc=qc, summary=summary, finished_at=timezone.now()
        )
    )
