"""Which changes start our flows (emg.triggers), beside the flows: the settings name this module
in EMG_TRIGGER_MODULES, and Django imports it as it starts (so it imports no flow code: the
runner imports the flow by its path).

A study created flagged `process_on_create` gets one run of `qc-raw-reads` (flows.read_qc), and
a StudyReport created one run of `process-study` (flows.process_study).

An analysis request runs once per generation: a new request, and each re-run of one
(emg.requests.rerun, a new generation), gets one event and one flow run of `analyse-study`.
"""

from django.db.models import CharField, Exists, IntegerField, OuterRef, Q, Value
from django.db.models.fields.json import KT
from django.db.models.functions import Cast, Concat

from emg import requests, study_reports, triggers
from emg.models import AnalysisRequest, OutboxEvent, Study, StudyQC, StudyReport
from flows.deployments import (
    ANALYSIS_DEPLOYMENT,
    ANALYSIS_TRIGGER,
    PROCESS_STUDY_DEPLOYMENT,
    PROCESS_STUDY_TRIGGER,
    READ_QC_DEPLOYMENT,
    READ_QC_TRIGGER,
)


def run_key(request: AnalysisRequest) -> str:
    # The idempotency key is then `<namespace>:analysis-request:<id>:generation:<n>`, as it always was.
    return f"{request.id}:generation:{request.generation}"


def parameters(request: AnalysisRequest) -> dict:
    return {"request_id": request.id, "generation": request.generation}


def is_current(request: AnalysisRequest, event: OutboxEvent) -> bool:
    """A generation re-run since, or a request ended (cancelled before its run began): no run."""
    return request.generation == event.parameters["generation"] and not request.is_final


def on_dispatched(request: AnalysisRequest, event: OutboxEvent, flow_run_id) -> None:
    """The run is the generation's: recorded on the request, once (and not on a later generation)."""
    requests.attach_flow_run(request.id, event.parameters["generation"], flow_run_id)


def run_name(request: AnalysisRequest, event: OutboxEvent) -> str:
    return f"{request.study.accession}-request-{request.id}-gen-{event.parameters['generation']}"


def tags(request: AnalysisRequest, event: OutboxEvent) -> list[str]:
    return ["emg", f"request-{request.id}"]


def missing(cutoff):
    """Unfinished requests saved without an event for their generation (bulk_create, a raw UPDATE
    of the generation): the sweep writes it, so they still run."""
    key = Concat(Cast(OuterRef("pk"), CharField()), Value(":generation:"), Cast(OuterRef("generation"), CharField()))
    return (
        AnalysisRequest.objects.unfinished()
        .filter(created_at__lt=cutoff)
        .exclude(Exists(OutboxEvent.objects.filter(trigger=ANALYSIS_TRIGGER, run_key=key)))
    )


analysis_request = triggers.on_save(
    AnalysisRequest,
    name=ANALYSIS_TRIGGER,
    deployment=ANALYSIS_DEPLOYMENT,
    flow="flows.analysis.analyse_study",
    parameters=parameters,
    run_key=run_key,
    is_current=is_current,
    on_dispatched=on_dispatched,
    run_name=run_name,
    tags=tags,
    missing=missing,
    # An ended request's events, and those of generations re-run since, are history.
    prunable=Q(request__status__in=AnalysisRequest.FINAL_STATUSES)
    | Q(request__generation__gt=Cast(KT("parameters__generation"), IntegerField())),
    # The request re-runs its own run (its re-run budget is per generation: emg.requests).
    recover=False,
    select_related=("study",),
)


def without_event(trigger: str):
    """Rows whose event, keyed by their id, was never written (bulk_create): the sweep writes theirs."""
    return ~Exists(OutboxEvent.objects.filter(trigger=trigger, run_key=Cast(OuterRef("pk"), CharField())))


def study_flagged_without_event(cutoff):
    # A study whose QC has begun had its event (it may have been pruned since): never a second run.
    return Study.objects.filter(
        without_event(READ_QC_TRIGGER), process_on_create=True, created_at__lt=cutoff, qc_runs__isnull=True
    )


def run_finished(results):
    """Events whose flow run wrote its finished row in `results` (StudyQC, StudyReport): history."""
    return Q(Exists(results.filter(flow_run_id=OuterRef("flow_run_id"), finished_at__isnull=False)))


# A study created flagged for processing gets its raw reads QC'd, once (its id is the run key).
study_created = triggers.on_create(
    Study,
    name=READ_QC_TRIGGER,
    deployment=READ_QC_DEPLOYMENT,
    flow="flows.read_qc.qc_raw_reads",
    when=lambda study: study.process_on_create,
    parameters=lambda study: {"study_id": study.id},
    run_key=lambda study: str(study.id),
    run_name=lambda study, event: f"{study.accession}-qc",
    tags=lambda study, event: ["emg", f"study-{study.accession}"],
    missing=study_flagged_without_event,
    prunable=run_finished(StudyQC.objects.all()),
)


# A StudyReport created asks for its study to be processed end to end, once (its id is the run key).
study_report = triggers.on_create(
    StudyReport,
    name=PROCESS_STUDY_TRIGGER,
    deployment=PROCESS_STUDY_DEPLOYMENT,
    flow="flows.process_study.process_study",
    parameters=lambda report: {"report_id": report.id},
    run_key=lambda report: str(report.id),
    on_dispatched=lambda report, event, flow_run_id: study_reports.attach_flow_run(report.id, flow_run_id),
    run_name=lambda report, event: f"{report.study.accession}-report-{report.id}",
    tags=lambda report, event: ["emg", f"study-{report.study.accession}"],
    # A report with a flow run recorded had its event (it may have been pruned since).
    missing=lambda cutoff: StudyReport.objects.filter(
        without_event(PROCESS_STUDY_TRIGGER), requested_at__lt=cutoff, flow_run_id__isnull=True
    ),
    prunable=run_finished(StudyReport.objects.all()),
    select_related=("study",),
)
