import pytest
from django.core.exceptions import ValidationError

from emg.models import Run, Sample, Study
from flows.study_records import ensure_samplesheet, samplesheet_text, store_study_and_runs

pytestmark = pytest.mark.django_db

# The shape of ENA Portal API read_run records (format=json): every value is a string.
RUN_RECORDS = [
    {
        "run_accession": "ERR4000011",
        "sample_accession": "SAMEA4000011",
        "study_accession": "PRJEB40001",
        "scientific_name": "marine sediment metagenome",
        "tax_id": "412755",
        "library_layout": "PAIRED",
        "library_strategy": "WGS",
        "instrument_model": "Illumina NovaSeq 6000",
        "read_count": "2000",
        "fastq_ftp": "ftp.sra.ebi.ac.uk/vol1/fastq/ERR400/001/ERR4000011/ERR4000011_1.fastq.gz;"
        "ftp.sra.ebi.ac.uk/vol1/fastq/ERR400/001/ERR4000011/ERR4000011_2.fastq.gz",
        "fastq_md5": "0f343b0931126a20f133d67c2b018a3b;1f343b0931126a20f133d67c2b018a3b",
    },
    {
        "run_accession": "ERR4000012",
        "sample_accession": "SAMEA4000012",
        "study_accession": "PRJEB40001",
        "scientific_name": "marine sediment metagenome",
        "tax_id": "412755",
        "library_layout": "SINGLE",
        "library_strategy": "WGS",
        "instrument_model": "Illumina NovaSeq 6000",
        "read_count": "",
        "fastq_ftp": "ftp.sra.ebi.ac.uk/vol1/fastq/ERR400/002/ERR4000012/ERR4000012.fastq.gz",
        "fastq_md5": "2f343b0931126a20f133d67c2b018a3b",
    },
]


def test_storing_runs_twice_upserts_without_duplicates():
    study = Study.objects.create(accession="PRJEB40001")
    for _ in range(2):
        store_study_and_runs(study, {"study_title": "Sediment survey"}, RUN_RECORDS)

    assert Sample.objects.count() == 2 and Run.objects.count() == 2
    study.refresh_from_db()
    assert study.title == "Sediment survey"
    paired = Run.objects.get(accession="ERR4000011")
    assert paired.read_count == 2000 and len(paired.fastq_ftp) == 2
    assert Run.objects.get(accession="ERR4000012").read_count is None


def test_a_malformed_run_accession_from_ena_is_a_clear_error_and_stores_nothing():
    study = Study.objects.create(accession="PRJEB40001")
    bad = [RUN_RECORDS[0], {**RUN_RECORDS[1], "run_accession": "ERR1;rm -rf /"}]
    with pytest.raises(ValidationError, match="Not an ENA run accession"):
        store_study_and_runs(study, {}, bad)
    assert Run.objects.count() == 0 and Sample.objects.count() == 0


def test_samplesheet_lists_every_run_as_urls_and_is_written_once(tmp_path, settings):
    settings.EMG_ENA_FASTQ_URL_PREFIX = "http://127.0.0.1:9/"
    study = Study.objects.create(accession="PRJEB40001")
    runs = store_study_and_runs(study, {}, RUN_RECORDS)

    text = samplesheet_text(runs)
    assert text.splitlines() == [
        "sample,run,fastq_1,fastq_2",
        "SAMEA4000011,ERR4000011,http://127.0.0.1:9/ftp.sra.ebi.ac.uk/vol1/fastq/ERR400/001/ERR4000011/"
        "ERR4000011_1.fastq.gz,http://127.0.0.1:9/ftp.sra.ebi.ac.uk/vol1/fastq/ERR400/001/ERR4000011/"
        "ERR4000011_2.fastq.gz",
        "SAMEA4000012,ERR4000012,http://127.0.0.1:9/ftp.sra.ebi.ac.uk/vol1/fastq/ERR400/002/ERR4000012/"
        "ERR4000012.fastq.gz,",
    ]
    path = ensure_samplesheet(tmp_path / "samplesheet.csv", runs)
    path.write_text(path.read_text() + "# edited by an operator\n")
    ensure_samplesheet(path, runs)
    assert path.read_text().endswith("# edited by an operator\n")
