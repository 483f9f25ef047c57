import pytest
from django.core.exceptions import ValidationError

from emg.models import AnalysisRequest, ClusterJob, OutboxEvent, Study

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "accession",
    ["", "PRJEB", "prjeb123", "PRJEB123;rm -rf /", "PRJEB12\n3", "ERP12", "PRJEB1234567890123", "ΡRJEB123", "X" * 500],
)
def test_invalid_accession_is_rejected_and_nothing_is_created(accession):
    with pytest.raises(ValidationError) as error:
        Study.objects.create(accession=accession)
    assert list(error.value.message_dict) == ["accession"]
    assert Study.objects.count() == 0
    assert OutboxEvent.objects.count() == 0
    assert ClusterJob.objects.count() == 0


def test_malformed_accession_error_says_what_is_expected():
    with pytest.raises(ValidationError, match="is not an ENA study accession .*PRJEB12345"):
        Study.objects.create(accession="PRJEB123;rm -rf /")


@pytest.mark.parametrize("accession", ["PRJEB12345", "PRJNA123456", "PRJDB1234", "ERP123456", "SRP0012345"])
def test_valid_accessions_are_accepted(accession):
    assert Study.objects.create(accession=accession).pk


@pytest.mark.parametrize(
    "options", [["--exit-code", "3"], {"Exit-Code": 3}, {"x; rm -rf /": 1}, {"exit_code": None}, {"flag": True}]
)
def test_invalid_pipeline_options_are_rejected_without_an_event(options):
    study = Study.objects.create(accession="PRJEB12345")
    with pytest.raises(ValidationError):
        AnalysisRequest.objects.create(study=study, pipeline_options=options)
    assert AnalysisRequest.objects.count() == 0
    assert OutboxEvent.objects.count() == 0


def test_declared_pipeline_options_are_accepted():
    study = Study.objects.create(accession="PRJEB12345")
    request = AnalysisRequest.objects.create(study=study, pipeline_options={"k": 31, "min_contig_length": 500})
    assert request.pipeline_options == {"k": 31, "min_contig_length": 500}


def test_saving_a_request_writes_one_run_event_per_generation(django_capture_on_commit_callbacks):
    study = Study.objects.create(accession="PRJEB12345")
    with django_capture_on_commit_callbacks() as callbacks:
        request = AnalysisRequest.objects.create(study=study)
    assert len(callbacks) == 1
    request.status_reason = "edited"
    request.save()
    assert OutboxEvent.objects.of(request).count() == 1

    request.generation = 2
    request.save()
    assert sorted(OutboxEvent.objects.of(request).values_list("parameters__generation", flat=True)) == [
        1,
        2,
    ]


# --- a status that reads forward ------------------------------------------------------------------


def test_a_resumed_flow_redoing_its_earlier_steps_does_not_show_them_again():
    from emg import requests

    study = Study.objects.create(accession="PRJEB12399")
    request = AnalysisRequest.objects.create(study=study)

    def shown() -> tuple[str, str]:
        request.refresh_from_db()
        return request.status, request.current_step

    # The first run: up to the data move, suspended there.
    for status, step in [
        ("RUNNING", "fetching from ENA"),
        ("RUNNING", "assembly"),
        ("WAITING", "assembly"),
        ("RUNNING", "assembly"),
        ("RUNNING", "analysis"),
        ("RUNNING", "data move"),
        ("WAITING", "data move"),
    ]:
        assert requests.advance(request.id, 1, status, step=step)
    assert shown() == ("WAITING", "data move")
    # Resumed: the flow runs from the top, through steps whose jobs have ended.
    assert requests.advance(request.id, 1, "RUNNING", step="fetching from ENA")
    assert shown() == ("RUNNING", "data move")
    assert requests.advance(request.id, 1, "RUNNING", step="assembly")
    assert shown() == ("RUNNING", "data move")
    assert requests.advance(request.id, 1, "COMPLETED", reason="results in /r")
    assert shown() == ("COMPLETED", "")
    # The resume's entry names the step the request had reached, not the one re-done.
    assert [(entry["state"], entry["detail"]) for entry in request.history][-2:] == [
        ("RUNNING", "data move"),
        ("COMPLETED", "results in /r"),
    ]

    # A new generation starts from the first step again.
    requests.rerun(request)
    assert requests.advance(request.id, 2, "RUNNING", step="fetching from ENA")
    assert shown() == ("RUNNING", "fetching from ENA")


def test_the_analysis_flow_names_only_the_steps_whose_order_is_known():
    import ast
    from pathlib import Path

    from emg.requests import STEPS

    source = Path(__file__).resolve().parent.parent / "flows" / "analysis.py"
    named = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            # A cluster step's name is the step its request shows: cluster_step(request, ClusterStep("assembly", ...)).
            if node.func.id == "ClusterStep" and isinstance(node.args[0], ast.Constant):
                named.add(node.args[0].value)
            if node.func.id == "set_status":
                named |= {
                    kw.value.value for kw in node.keywords if kw.arg == "step" and isinstance(kw.value, ast.Constant)
                }
    assert named and named <= set(STEPS), named - set(STEPS)
    assert {"fetching from ENA", "assembly", "analysis", "data move"} <= named


def test_the_unfinished_request_index_covers_exactly_the_unfinished_statuses():
    """The partial index names the final statuses literally (a Meta cannot name its class's attributes)."""
    (index,) = [index for index in AnalysisRequest._meta.indexes if index.name == "request_unfinished"]
    assert index.condition.negated
    ((lookup, statuses),) = index.condition.children
    assert lookup == "status__in" and set(statuses) == set(AnalysisRequest.FINAL_STATUSES)


def test_the_reconciler_reads_the_live_jobs_through_their_partial_index(db):
    """With many ended jobs and a few live ones, the live ones are found by the index, not a scan."""
    from django.db import connection

    ClusterJob.objects.bulk_create(
        [ClusterJob(name="ended", fingerprint=f"ended-{n}", spec={}, state="COMPLETED") for n in range(5000)]
        + [ClusterJob(name="live", fingerprint=f"live-{n}", spec={}, state="RUNNING") for n in range(5)]
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE emg_clusterjob")
    plan = ClusterJob.objects.live().explain()
    assert "cluster_job_live" in plan, plan
