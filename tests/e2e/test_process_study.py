"""A study processed end to end: a StudyReport saved starts a parent flow that runs the study's QC
and its analysis request as child flows, waits for both suspended, and writes the report.

On the session's stack (outbox, Redis, Celery, Prefect, the reconciler, real Slurm), ENA recorded.
"""

import pytest

from emg.models import AnalysisRequest, ChildRunState, OutboxEvent, Study, StudyReport
from flows.deployments import PROCESS_STUDY_TRIGGER
from tests.e2e.requests import jobs_of
from tests.flowkit import assert_each_job_ran_once_in_slurm, run_started_by

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.django_db(transaction=True)]


def test_a_report_runs_qc_and_analysis_as_children_of_one_suspended_parent_and_the_request_runs_once(stack, ena_server):
    report = StudyReport.objects.create(study=Study.objects.create(accession="PRJEB40001"))
    parent = run_started_by(report, PROCESS_STUDY_TRIGGER)

    # The flow writes the report as its last step; Prefect's state follows.
    states = parent.wait_for_state("Completed", timeout=360)

    report.refresh_from_db()
    assert report.finished_at is not None and report.flow_run_id == parent.flow_run_id

    request = AnalysisRequest.objects.get(study_report=report)
    assert request.status == AnalysisRequest.Status.COMPLETED, request.status_reason
    summary = report.summary
    assert summary["qc"] == {"state": "COMPLETED", "runs": 2, "passed": 2, "failed": {}}, summary
    assert summary["analysis"]["status"] == "COMPLETED" and summary["analysis"]["assembly"]["contigs"] > 0
    assert report.qc is not None and report.qc.runs_passed == 2
    # Two children of the parent; the analysis child is the run the request's own trigger made.
    children = parent.children()
    assert {key: child.state for key, child in children.items()} == {
        "qc": ChildRunState.COMPLETED,
        f"analysis-request:{request.id}:generation:1": ChildRunState.COMPLETED,
    }
    analysis_child = children[f"analysis-request:{request.id}:generation:1"]
    [event] = OutboxEvent.objects.of(request)
    assert analysis_child.child_flow_run_id == request.flow_run_id == event.flow_run_id
    assert report.qc.flow_run_id == children["qc"].child_flow_run_id
    assert_each_job_ran_once_in_slurm(jobs_of(request).values())
    # The parent waited for both with one suspension and was resumed once.
    assert states.count("Suspended") == 1 and states.count("Resuming") == 1, states
