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
    assert OutboxEvent.objects.filter(request=request).count() == 1

    request.generation = 2
    request.save()
    assert sorted(OutboxEvent.objects.filter(request=request).values_list("generation", flat=True)) == [1, 2]
