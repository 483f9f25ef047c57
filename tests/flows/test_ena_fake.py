"""The local fake of the ENA Portal API, over real HTTP."""

import gzip
import hashlib
import time

import httpx
import pytest

from devstack.ena_fake import FakeEnaServer, Recordings

RUN_FIELDS = "sample_accession,study_accession,library_layout,read_count,base_count,fastq_ftp,fastq_md5,fastq_bytes"


@pytest.fixture(scope="module")
def server():
    """One server for the module, without the recorded 15 s delay (tests of the delay start their own)."""
    fake = FakeEnaServer(delays={"PRJEB40408": 0})
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(autouse=True)
def fresh_counts(server):
    server.reset_counts()


def search(server, result, query, fields="", response_format="json", **params):
    return httpx.get(
        f"{server.base_url}/search",
        timeout=30,
        params={"result": result, "query": query, "fields": fields, "format": response_format, **params},
    )


def study_query(accession):
    return f'study_accession="{accession}" OR secondary_study_accession="{accession}"'


def test_the_base_url_ends_in_the_portal_api_path(server):
    assert server.base_url.startswith("http://127.0.0.1:")
    assert server.base_url.endswith("/ena/portal/api")
    assert server.fastq_url_prefix == server.base_url.removesuffix("ena/portal/api")


def test_read_runs_come_as_a_json_list_of_string_values_with_the_run_accession_first(server):
    response = search(server, "read_run", 'study_accession="PRJEB40001"', RUN_FIELDS)

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    runs = response.json()
    assert [run["run_accession"] for run in runs] == ["ERR4800011", "ERR4800012"]
    assert list(runs[0]) == ["run_accession", *RUN_FIELDS.split(",")]
    assert all(isinstance(value, str) for run in runs for value in run.values())
    assert runs[0]["library_layout"] == "PAIRED"
    mates = runs[0]["fastq_ftp"].split(";")
    assert mates[0] == "ftp.sra.ebi.ac.uk/vol1/fastq/ERR480/001/ERR4800011/ERR4800011_1.fastq.gz"
    assert mates[1].endswith("ERR4800011_2.fastq.gz") and "://" not in runs[0]["fastq_ftp"]


def test_the_study_is_found_by_its_primary_or_secondary_accession(server):
    fields = "secondary_study_accession,study_title,center_name,first_public"
    by_primary = search(server, "study", study_query("PRJEB40001"), fields).json()
    by_secondary = search(server, "study", study_query("ERP124001"), fields).json()

    assert by_primary == by_secondary
    assert by_primary[0]["study_accession"] == "PRJEB40001"
    assert by_primary[0]["study_title"] == "Metagenomes of North Sea coastal sediment cores"


@pytest.mark.parametrize("accession", ["PRJEB40003", "PRJEB99999"])
def test_no_matching_runs_is_200_with_an_empty_list_not_an_error(server, accession):
    response = search(server, "read_run", f'study_accession="{accession}"', "fastq_ftp")

    assert response.status_code == 200
    assert response.json() == []


def test_an_unknown_study_is_200_with_an_empty_list_as_in_the_real_api(server):
    assert search(server, "study", study_query("PRJEB99999"), "study_title").json() == []
    assert search(server, "study", study_query("PRJEB40003"), "study_title").json() != []


def test_tsv_is_the_header_and_one_line_per_record_and_empty_is_the_header_alone(server):
    runs = search(server, "read_run", 'study_accession="PRJEB40001"', "fastq_ftp", response_format="tsv").text
    none = search(server, "read_run", 'study_accession="PRJEB40003"', "fastq_ftp", response_format="tsv").text

    assert runs.splitlines()[0] == "run_accession\tfastq_ftp"
    assert len(runs.splitlines()) == 3
    assert none == "run_accession\tfastq_ftp\n"


@pytest.mark.parametrize(
    ("query", "fields", "message"),
    [
        ('study_accession="PRJEB40001"', "run_accession,not_a_field", "Invalid fieldName(s) supplied: not_a_field"),
        ('fastq_ftp="x"', "", "Invalid column (fastq_ftp) has been provided in query"),
        ('study_accession="PRJEB40001" AND', "", "Invalid query"),
        ('(study_accession="PRJEB40001"', "", "expected ')'"),
    ],
)
def test_a_bad_request_is_400_with_a_json_message(server, query, fields, message):
    response = search(server, "read_run", query, fields)

    assert response.status_code == 400
    assert message in response.json()["message"]


def test_queries_combine_with_and_or_not_and_parentheses(server):
    query = '(study_accession="PRJEB40001" OR study_accession="PRJEB40002") AND NOT run_accession="ERR4800012"'

    runs = search(server, "read_run", query, "study_accession").json()

    assert [run["run_accession"] for run in runs] == ["ERR4800011", "ERR4800021"]


def test_the_500_study_fails_twice_then_answers(server):
    statuses = [search(server, "study", study_query("PRJEB40500"), "study_title").status_code for _ in range(3)]

    assert statuses == [500, 500, 200]
    [run] = search(server, "read_run", 'study_accession="PRJEB40500"', "fastq_ftp").json()
    assert run["run_accession"] == "ERR4805001"
    assert server.request_count("PRJEB40500") == 4


def test_the_404_study_always_answers_404(server):
    responses = [search(server, "study", study_query("PRJEB40404"), "study_title") for _ in range(3)]

    assert {response.status_code for response in responses} == {404}
    assert "PRJEB40404" in responses[0].json()["message"]


def test_requests_are_counted_by_accession_and_result_until_reset(server):
    search(server, "study", study_query("PRJEB40001"), "study_title")
    search(server, "read_run", 'study_accession="PRJEB40001"', "fastq_ftp")
    search(server, "read_run", 'study_accession="PRJEB40002"', "fastq_ftp")

    assert server.request_count() == 3
    assert server.request_count("PRJEB40001") == 2
    assert server.request_count("PRJEB40001", result="read_run") == 1
    assert server.request_count(result="read_run") == 2
    assert server.request_count("PRJEB40003") == 0
    server.reset_counts()
    assert server.request_count() == 0


def test_the_fastq_files_named_by_fastq_ftp_are_served_and_match_the_recorded_figures(server):
    [run] = search(server, "read_run", 'study_accession="PRJEB40002"', RUN_FIELDS).json()
    mates = []
    for entry, md5, size in zip(*(run[field].split(";") for field in ("fastq_ftp", "fastq_md5", "fastq_bytes"))):
        response = httpx.get(server.fastq_url_prefix + entry, timeout=30)
        assert response.status_code == 200
        assert hashlib.md5(response.content).hexdigest() == md5 and len(response.content) == int(size)
        mates.append(gzip.decompress(response.content).decode().splitlines())

    assert len(mates) == 2 and len(mates[0]) == len(mates[1]) == 4 * int(run["read_count"])
    assert sum(len(line) for mate in mates for line in mate[1::4]) == int(run["base_count"])
    assert mates[0][0].startswith("@ERR4800021.1 ") and mates[1][0].endswith("/2")


INTACT_RUNS = [
    row["run_accession"]
    for row in Recordings.load().rows["read_run"]
    if not Recordings.load().read_specs[row["run_accession"]].get("truncate_mate_2")
]


@pytest.mark.parametrize("run", INTACT_RUNS)
def test_every_recorded_read_count_and_base_count_agree_with_the_served_reads(server, run):
    [row] = [row for row in server.recordings.rows["read_run"] if row["run_accession"] == run]
    mates = [
        gzip.decompress(httpx.get(server.fastq_url_prefix + entry, timeout=30).content).decode().splitlines()
        for entry in row["fastq_ftp"].split(";")
    ]

    assert len(mates[0]) == 4 * int(row["read_count"])
    assert sum(len(line) for mate in mates for line in mate[1::4]) == int(row["base_count"])


def test_the_served_reads_are_the_same_from_one_server_to_the_next(server):
    other = FakeEnaServer()
    other.start()
    try:
        path = "ftp.sra.ebi.ac.uk/vol1/fastq/ERR480/001/ERR4800021/ERR4800021_1.fastq.gz"
        assert httpx.get(other.fastq_url_prefix + path).content == httpx.get(server.fastq_url_prefix + path).content
    finally:
        other.stop()


def test_an_unknown_path_is_404(server):
    assert httpx.get(server.fastq_url_prefix + "ftp.sra.ebi.ac.uk/vol1/fastq/nothing.fastq.gz").status_code == 404


def test_the_delayed_study_answers_after_the_configured_delay_and_others_do_not_wait():
    fake = FakeEnaServer(delays={"PRJEB40408": 1.0})
    fake.start()
    try:
        started = time.monotonic()
        response = search(fake, "study", study_query("PRJEB40408"), "study_title")
        assert response.status_code == 200 and time.monotonic() - started >= 1.0
        assert search(fake, "study", study_query("PRJEB40001"), "study_title").elapsed.total_seconds() < 1.0
    finally:
        fake.stop()


def test_the_recorded_delay_defaults_to_fifteen_seconds_and_faults_can_be_switched_off():
    fake = FakeEnaServer(failures={"PRJEB40500": (500, 0)})
    fake.start()
    try:
        assert fake.delays["PRJEB40408"] == 15.0
        assert search(fake, "study", study_query("PRJEB40500"), "study_title").status_code == 200
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(
                f"{fake.base_url}/search", params={"result": "study", "query": study_query("PRJEB40408")}, timeout=0.5
            )
    finally:
        started = time.monotonic()
        fake.stop()
        assert time.monotonic() - started < 5  # a request still sleeping does not hold up stop()


def test_a_truncated_upload_is_served_cut_off_mid_record(server):
    path = "ftp.sra.ebi.ac.uk/vol1/fastq/ERR480/001/ERR4806661/ERR4806661_2.fastq.gz"
    lines = gzip.decompress(httpx.get(server.fastq_url_prefix + path, timeout=30).content).decode().splitlines()
    assert len(lines) % 4 != 0
    assert len(Recordings.load().read_specs) > len(INTACT_RUNS)
