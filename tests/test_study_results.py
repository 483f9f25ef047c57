"""A study's QC and report are recorded once, whoever records them and however often (emg.qc,
emg.study_reports): a flow re-run from the top, or a zombie and its re-run, cannot write twice."""

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from emg import qc as study_qc
from emg import study_reports
from emg.models import AnalysisRequest, ClusterJob, OutboxEvent, Run, RunQC, Sample, Study, StudyQC, StudyReport
from flows.triggers import study_report

pytestmark = pytest.mark.django_db


def a_run(study: Study, accession: str) -> Run:
    sample = Sample.objects.create(accession=f"SAMEA{accession[3:]}", study=study)
    return Run.objects.create(accession=accession, study=study, sample=sample)


def run_result(qc: StudyQC, run: Run, passed: bool) -> RunQC:
    job = ClusterJob.objects.create(name=f"emg-qc-{run.accession}", fingerprint=uuid.uuid4().hex, spec={})
    return RunQC(
        study_qc=qc,
        run=run,
        job=job,
        reads=400,
        bases=40_000,
        mean_quality=36.9,
        q30_percent=99.8,
        gc_percent=51.0,
        passed=passed,
        failed_because="" if passed else "too few reads",
    )


def test_a_qc_keeps_the_runs_of_its_first_fetch_and_is_finished_once():
    study = Study.objects.create(accession="PRJEB40012")
    flow_run = uuid.uuid4()
    first = study_qc.begin(study, flow_run, ["ERR4801202", "ERR4801201"])
    again = study_qc.begin(study, flow_run, ["ERR4801201"])
    assert again.id == first.id and again.run_accessions == ["ERR4801201", "ERR4801202"]

    runs = [a_run(study, accession) for accession in first.run_accessions]
    results = [run_result(first, runs[0], True), run_result(first, runs[1], False)]
    assert study_qc.finish(first, results, {"passed": ["ERR4801201"]})
    assert not study_qc.finish(first, [run_result(first, runs[0], True)], {"passed": []})
    assert not study_qc.fail(first, "too late")

    first.refresh_from_db()
    assert (first.runs_passed, first.total_reads, first.summary) == (1, 800, {"passed": ["ERR4801201"]})
    assert RunQC.objects.filter(study_qc=first).count() == 2


def test_a_report_makes_its_analysis_request_once_and_is_written_once():
    report = StudyReport.objects.create(study=Study.objects.create(accession="PRJEB40001"))

    request = study_reports.request_of(report)
    assert study_reports.request_of(report) == request
    assert AnalysisRequest.objects.filter(study=report.study).count() == 1
    assert OutboxEvent.objects.of(request).filter(trigger="analysis-request").count() == 1  # its trigger fired

    flow_run = uuid.uuid4()
    assert study_reports.attach_flow_run(report.id, flow_run) and not study_reports.attach_flow_run(
        report.id, uuid.uuid4()
    )
    assert study_reports.finish(report, None, {"qc": {}}) and not study_reports.finish(report, None, {"again": 1})
    report.refresh_from_db()
    assert (report.flow_run_id, report.summary, report.request) == (flow_run, {"qc": {}}, request)


def test_a_report_whose_run_began_is_never_given_a_second_event_by_the_sweep():
    [begun, forgotten] = StudyReport.objects.bulk_create(
        [StudyReport(study=Study.objects.create(accession=accession)) for accession in ("PRJEB40001", "PRJEB40002")]
    )
    study_reports.attach_flow_run(begun.id, uuid.uuid4())  # its event was dispatched, and pruned since

    assert list(study_report.missing(timezone.now() + timedelta(seconds=1))) == [forgotten]
