"""Process a study: its raw-reads QC and its assembly and analysis as child flows, then its report.

Started by the `study-report` trigger (flows.triggers) when a StudyReport is created. The parent
holds no process while its children run (days, on the cluster): it starts both, suspends once,
and the reconciler resumes it when both have ended. Re-run from the top at every resume, it finds
the same children again:
- the QC is a child of its own (`qc-raw-reads`, keyed "qc" within this run);
- the analysis is the run the analysis-request trigger starts for the request this flow made on
  its first pass (emg.study_reports.request_of): the parent adopts it as its child by that run's
  Prefect key (`flows.child_flows.trigger_run`), so the request runs once, whoever creates its run.
"""

import logging

from flows.django_setup import setup_django

setup_django()

from prefect import flow, get_run_logger  # noqa: E402

from emg import study_reports  # noqa: E402
from emg.connections import from_the_top_if_disconnected  # noqa: E402
from emg.models import AnalysisRequest, StudyQC, StudyReport  # noqa: E402
from flows.child_flows import ChildFlow, ChildFlowFailed, ChildResult, run_children, trigger_run  # noqa: E402
from flows.deployments import ANALYSIS_TRIGGER, PROCESS_STUDY_FLOW_NAME, READ_QC_DEPLOYMENT  # noqa: E402

logger = logging.getLogger(__name__)
QC_CHILD = "qc"


def qc_part(study_id: int, child: ChildResult) -> tuple[StudyQC | None, dict]:
    qc = StudyQC.objects.filter(study_id=study_id, flow_run_id=child.flow_run_id).first() if child.flow_run_id else None
    if qc is None or qc.finished_at is None:
        return qc, {"state": child.state, "message": child.message, "error": "the QC recorded nothing"}
    if "error" in qc.summary:
        return qc, {"state": child.state, "error": qc.summary["error"]}
    passed, failed = qc.summary.get("passed", []), qc.summary.get("failed", {})
    return qc, {"state": child.state, "runs": qc.summary.get("runs"), "passed": len(passed), "failed": failed}


def analysis_part(request: AnalysisRequest, child: ChildResult) -> dict:
    part: dict = {"state": child.state, "request": request.id, "status": request.status}
    if request.status_reason:
        part["reason"] = request.status_reason
    assembly = getattr(request, "assembly", None)
    if assembly is not None:
        part["assembly"] = {"contigs": assembly.contigs, "total_length": assembly.total_length, "n50": assembly.n50}
        if assembly.analysis_skipped_reason:
            part["analysis_skipped"] = assembly.analysis_skipped_reason
    analysis = getattr(request, "analysis", None)
    if analysis is not None:
        part["orfs"] = (analysis.summary.get("orfs") or {}).get("count")
    return part


@flow(name=PROCESS_STUDY_FLOW_NAME, persist_result=True)
@from_the_top_if_disconnected
def process_study(report_id: int) -> dict:
    log = get_run_logger()
    report = StudyReport.objects.select_related("study").get(id=report_id)
    if report.finished_at is not None:
        return report.summary
    request = study_reports.request_of(report)
    try:
        qc_child, analysis_child = run_children(
            [
                ChildFlow(READ_QC_DEPLOYMENT, {"study_id": report.study_id}, key=QC_CHILD),
                trigger_run(ANALYSIS_TRIGGER, request),
            ]
            # No request_id: children tied to a request are given up when it ends, and the QC may
            # outlast the analysis.
        )
    except ChildFlowFailed as failed:
        # Both have ended all the same: the report says how each did.
        log.warning("study %s: %s", report.study.accession, failed)
        qc_child, analysis_child = failed.results
    request = AnalysisRequest.objects.select_related("assembly", "analysis").get(id=request.id)
    qc, qc_summary = qc_part(report.study_id, qc_child)
    summary = {"study": report.study.accession, "qc": qc_summary, "analysis": analysis_part(request, analysis_child)}
    if not study_reports.finish(report, qc, summary):
        log.info("the report on %s had been written already", report.study.accession)
    return summary
