"""Pipeline options are declared per pipeline; a request's options are checked on every path a row can take.

Forms and the ORM refuse a bad option with a message naming it; the database refuses what it can
check itself (a non-object, a reserved name) however the row is written; and the flow refuses to
run any row that got past both, before it fetches or submits anything.
"""

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.urls import reverse
from django.utils import timezone

from emg import triggers
from emg.models import AnalysisRequest, ClusterJob, JobWait, OutboxEvent, Study
from emg.outbox import record
from emg.pipeline_options import OPTIONS, option_arguments, resolved_options
from flows.deployments import ANALYSIS_TRIGGER
from tests.services import broker_unreachable

pytestmark = pytest.mark.django_db(transaction=True)

# (options, what the error must say)
BAD_OPTIONS = [
    ({"outdir": "/tmp/elsewhere"}, "'outdir' is set by the orchestrator"),
    ({"samplesheet": "/etc/passwd"}, "'samplesheet' is set by the orchestrator"),
    ({"input": "x.csv"}, "'input' is set by the orchestrator"),
    ({"contigs": "x.fa"}, "'contigs' is set by the orchestrator"),
    ({"c": "evil.config"}, "'c' is set by the orchestrator"),
    ({"profile": "docker"}, "'profile' is set by the orchestrator"),
    ({"params-file": "p.yaml"}, "'params-file' is set by the orchestrator"),
    ({"work-dir": "/scratch"}, "'work-dir' is set by the orchestrator"),
    ({"-resume": True}, "'-resume' is set by the orchestrator"),
    ({"with_trace": "t.txt"}, "'with_trace' is set by the orchestrator"),
    ({"kmer": 21}, "Unknown pipeline option 'kmer'"),
    ({"k": "21"}, "'k' must be an integer, not '21'"),
    ({"k": 21.0}, "'k' must be an integer"),
    ({"k": True}, "'k' must be an integer"),
    ({"k": None}, "'k' must be an integer"),
    ({"k": 7}, "'k' must be between 11 and 127, not 7"),
    ({"k": 129}, "'k' must be between 11 and 127, not 129"),
    ({"k": 22}, "'k' must be odd, not 22"),
    ({"min_contig_length": 0}, "'min_contig_length' must be between 1 and 1000000"),
    ({"min-contig-length": 300}, "'min-contig-length' must be lowercase letters, digits and underscores"),
    ([["k", 21]], "must be a JSON object"),
    ("k=21", "must be a JSON object"),
    (None, "must be a JSON object of option name to value ({} for none), not null"),
]


# The request page's inline (its job waits) posts a management form with the request.
INLINE = {"waits-TOTAL_FORMS": "0", "waits-INITIAL_FORMS": "0"}


def study(accession: str = "PRJEB40001") -> Study:
    return Study.objects.get_or_create(accession=accession)[0]


def nothing_submitted() -> None:
    assert AnalysisRequest.objects.count() == 0
    assert OutboxEvent.objects.count() == 0
    assert ClusterJob.objects.count() == 0


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS)
def test_the_orm_refuses_a_bad_option_naming_it_and_saves_nothing(options, message):
    with pytest.raises(ValidationError) as refused:
        AnalysisRequest.objects.create(study=study(), pipeline_options=options)

    assert message in " ".join(refused.value.message_dict["pipeline_options"])
    nothing_submitted()


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS)
def test_the_admin_form_answers_a_bad_option_with_a_form_error_naming_it(admin_client, options, message):
    import json

    text = "null" if options is None else (json.dumps(options) if not isinstance(options, str) else options)
    response = admin_client.post(
        reverse("admin:emg_analysisrequest_add"), {"study": study().id, "pipeline_options": text, **INLINE}
    )

    assert response.status_code == 200  # the form again, with its errors; never a 500
    errors = response.context["adminform"].form.errors
    assert "pipeline_options" in errors, errors
    if not isinstance(options, str):  # a bare string is not JSON at all: the form field says so itself
        assert message in " ".join(errors["pipeline_options"]), errors
    nothing_submitted()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "{",
        "NaN",
        '{"k": 1e400}',
        '{"k": NaN}',
        '{"k": "\\u0000"}',
        '{"\\u0000": 1}',
        "[" * 2000 + "]" * 2000,
    ],
)
def test_the_admin_form_answers_any_unparsable_or_strange_json_with_a_form_error(admin_client, text):
    response = admin_client.post(
        reverse("admin:emg_analysisrequest_add"), {"study": study().id, "pipeline_options": text, **INLINE}
    )

    assert response.status_code in (200, 302)
    if response.status_code == 200:
        assert response.context["adminform"].form.errors
    else:  # an empty field means the defaults
        assert AnalysisRequest.objects.get().pipeline_options == {}


def test_the_admin_form_saves_declared_options_and_says_which_exist(admin_client):
    page = admin_client.get(reverse("admin:emg_analysisrequest_add"))
    assert "k (assembly, int 11..127, odd, default 21)" in page.content.decode()

    response = admin_client.post(
        reverse("admin:emg_analysisrequest_add"), {"study": study().id, "pipeline_options": '{"k": 31}', **INLINE}
    )

    assert response.status_code == 302
    assert AnalysisRequest.objects.get().pipeline_options == {"k": 31}


def test_options_reach_the_pipeline_by_their_declared_names_with_every_default_spelled_out():
    assert resolved_options("assembly", {}) == {"k": 21, "min_contig_length": 200}
    assert resolved_options("assembly", {"min_contig_length": 500}) == {"k": 21, "min_contig_length": 500}
    # Exactly as declared: no `_` becomes `-`.
    assert option_arguments(resolved_options("assembly", {"k": 31})) == ["--k", "31", "--min_contig_length", "200"]
    assert all(option.default is not None for option in OPTIONS.values())


@pytest.mark.parametrize(
    ("options", "constraint"),
    [
        ({"outdir": "/tmp/x"}, "pipeline_options_not_reserved"),
        ({"k": 21, "params-file": "p.yaml"}, "pipeline_options_not_reserved"),
        ([1, 2], "pipeline_options_is_an_object"),
        ("text", "pipeline_options_is_an_object"),
        (7, "pipeline_options_is_an_object"),
    ],
)
def test_the_database_refuses_a_reserved_name_or_a_non_object_however_the_row_is_written(options, constraint):
    with pytest.raises(IntegrityError, match=constraint), transaction.atomic():
        AnalysisRequest.objects.bulk_create([AnalysisRequest(study=study(), pipeline_options=options)])
    with pytest.raises(IntegrityError, match=constraint), transaction.atomic():
        AnalysisRequest.objects.filter(
            id=AnalysisRequest.objects.bulk_create([AnalysisRequest(study=study())])[0].id
        ).update(pipeline_options=options)
    with pytest.raises(IntegrityError, match=constraint), transaction.atomic(), connection.cursor() as cursor:
        import json

        cursor.execute(
            "INSERT INTO emg_analysisrequest (study_id, pipeline_options, status, status_reason, current_step,"
            " generation, created_at, updated_at, flow_reruns, ena_runs, history) VALUES (%s, %s::jsonb, 'PENDING',"
            " '', '', 1, now(), now(), 0, '[]', '[]')",
            [study().id, json.dumps(options)],
        )
    assert AnalysisRequest.objects.count() == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k": 22}, "'k' must be odd"),
        ({"k": "31"}, "'k' must be an integer"),
        ({"note": "x"}, "Unknown pipeline option 'note'"),
        ({"-resume": True}, "'-resume' is set by the orchestrator"),
    ],
)
def test_a_bulk_created_invalid_request_ends_failed_with_the_reason_before_anything_is_fetched_or_declared(
    prefect_api_url, ena_server, settings, options, message
):
    from flows.analysis import analyse_study

    settings.EMG_ENA_PORTAL_API = ena_server.base_url
    ena_server.reset_counts()
    with broker_unreachable():
        [request] = AnalysisRequest.objects.bulk_create([AnalysisRequest(study=study(), pipeline_options=options)])
        # What the outbox sweep does for a request without an event: it runs.
        event = record(triggers.get(ANALYSIS_TRIGGER), request)
        OutboxEvent.objects.filter(id=event.id).update(dispatched_at=timezone.now())

    assert analyse_study(request_id=request.id) == AnalysisRequest.Status.FAILED

    request.refresh_from_db()
    assert request.status == AnalysisRequest.Status.FAILED and request.finished_at is not None
    assert request.current_step == "validating the request"
    assert request.status_reason.startswith("invalid request: pipeline_options:")
    assert message in request.status_reason
    assert ena_server.request_count() == 0
    assert not ClusterJob.objects.exists() and not JobWait.objects.exists()


def test_a_bulk_created_request_for_a_malformed_accession_ends_failed_before_ena_is_asked(
    prefect_api_url, ena_server, settings
):
    from flows.analysis import analyse_study

    settings.EMG_ENA_PORTAL_API = ena_server.base_url
    ena_server.reset_counts()
    with broker_unreachable():
        [bad_study] = Study.objects.bulk_create([Study(accession="PRJEB1; rm -rf /")])
        [request] = AnalysisRequest.objects.bulk_create([AnalysisRequest(study=bad_study)])

    assert analyse_study(request_id=request.id) == AnalysisRequest.Status.FAILED

    request.refresh_from_db()
    assert request.status_reason.startswith("invalid request: accession:")
    assert "is not an ENA study accession" in request.status_reason
    assert ena_server.request_count() == 0 and not ClusterJob.objects.exists()
