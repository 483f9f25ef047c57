"""The stand-in pipelines, run for real as the cluster runs them: /usr/bin/python3 and bash, clean environment."""

import gzip
import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from devstack.ena_fake import FakeEnaServer
from flows.nextflow_trace import parse_trace

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


@pytest.fixture(scope="module")
def ena(ena_server):
    """The session's fake ENA (tests/conftest.py)."""
    return ena_server


def run_pipeline(*command, timeout=120) -> subprocess.CompletedProcess:
    arguments = [str(part) for part in command]
    return subprocess.run(arguments, env=CLEAN_ENV, capture_output=True, text=True, timeout=timeout)


def assembly(samplesheet: Path, outdir: Path, *options) -> subprocess.CompletedProcess:
    return run_pipeline(
        "/usr/bin/python3", PIPELINES / "assembly.py", "--samplesheet", samplesheet, "--outdir", outdir, *options
    )


def write_samplesheet(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    path.write_text("sample,run,fastq_1,fastq_2\n" + "".join(",".join(row) + "\n" for row in rows))
    return path


def study_samplesheet(ena: FakeEnaServer, accession: str, path: Path) -> Path:
    """The samplesheet the flow writes: one row per run, read URLs from fastq_ftp."""
    runs = httpx.get(
        f"{ena.base_url}/search",
        params={
            "result": "read_run",
            "query": f'study_accession="{accession}"',
            "fields": "sample_accession,fastq_ftp",
            "format": "json",
        },
    ).json()
    rows = []
    for run in runs:
        urls = [ena.fastq_url_prefix + entry for entry in run["fastq_ftp"].split(";")]
        rows.append((run["sample_accession"], run["run_accession"], urls[0], urls[1] if len(urls) > 1 else ""))
    return write_samplesheet(path, rows)


@pytest.fixture(scope="module")
def assembled(ena, tmp_path_factory) -> Path:
    """PRJEB40001 assembled once for the module's tests."""
    work = tmp_path_factory.mktemp("PRJEB40001")
    result = assembly(study_samplesheet(ena, "PRJEB40001", work / "samplesheet.csv"), work / "results")
    assert result.returncode == 0, result.stderr
    return work / "results"


def test_assembly_of_a_well_covered_study_gives_contigs_over_ten_kb(assembled):
    stats = json.loads((assembled / "assembly_stats.json").read_text())
    headers = [line for line in (assembled / "contigs.fasta").read_text().splitlines() if line.startswith(">")]

    assert stats["reads"] == 2 * (2400 + 1800) and stats["bases"] == 125 * stats["reads"]
    assert stats["total_length"] > 10_000 and stats["contigs"] == len(headers)
    assert stats["k"] == 21 and stats["longest"] >= stats["n50"] >= 200
    assert headers[0] == f">contig_1 len={stats['longest']}" + headers[0].split(f"len={stats['longest']}")[1]


def test_assembly_writes_a_trace_with_one_completed_row_per_step(assembled):
    tasks = parse_trace((assembled / "pipeline_info" / "execution_trace.txt").read_text())

    assert [task.name for task in tasks] == [
        "FETCH_READS (SAMEA7400011)",
        "READ_QC (SAMEA7400011)",
        "FETCH_READS (SAMEA7400012)",
        "READ_QC (SAMEA7400012)",
        "ASSEMBLE",
        "CONTIG_STATS",
    ]
    assert {task.status for task in tasks} == {"COMPLETED"} and {task.exit for task in tasks} == {0}
    assert all(task.realtime_s is not None and task.submit is not None for task in tasks)
    assert all(task.peak_rss_bytes > 0 for task in tasks)


def test_a_low_coverage_study_assembles_to_little(ena, tmp_path):
    result = assembly(study_samplesheet(ena, "PRJEB40002", tmp_path / "samplesheet.csv"), tmp_path / "results")

    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "results" / "assembly_stats.json").read_text())
    assert stats["reads"] == 300
    assert stats["total_length"] < 1_000


def test_local_plain_single_end_fastq_assembles(ena, assembled, tmp_path):
    """A local, uncompressed, single-end file is as good as a gzipped URL pair."""
    path = "ftp.sra.ebi.ac.uk/vol1/fastq/ERR480/001/ERR4800011/ERR4800011_1.fastq.gz"
    reads = tmp_path / "reads.fastq"
    reads.write_bytes(gzip.decompress(httpx.get(ena.fastq_url_prefix + path).content))
    sheet = write_samplesheet(tmp_path / "samplesheet.csv", [("s1", "ERR4800011", str(reads), "")])

    result = assembly(sheet, tmp_path / "results", "--k", "25", "--min-contig-length", "500")

    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "results" / "assembly_stats.json").read_text())
    assert (stats["reads"], stats["k"]) == (2400, 25)
    assert all(
        int(line.split("len=")[1].split()[0]) >= 500
        for line in (tmp_path / "results" / "contigs.fasta").read_text().splitlines()
        if line.startswith(">")
    )


@pytest.mark.parametrize(
    ("fastq", "message"),
    [
        ("@r1\nACGT\n+\nIIII\nr2\nACGT\n+\nIIII\n", "record 2 (line 5): a FASTQ record starts with '@'"),
        ("@r1\nACGT\n-\nIIII\n", "record 1 (line 1): the third line of a FASTQ record starts with '+'"),
        ("@r1\nACGT\n+\nIII\n", "sequence and quality differ in length (4 and 3)"),
        ("@r1\nACGT\n+\n", "or the file is truncated"),
    ],
)
def test_bad_fastq_fails_with_a_clear_error_and_a_failed_trace_row(tmp_path, fastq, message):
    reads = tmp_path / "bad.fastq"
    reads.write_text(fastq)
    sheet = write_samplesheet(tmp_path / "samplesheet.csv", [("s1", "ERR1", str(reads), "")])

    result = assembly(sheet, tmp_path / "results")

    assert result.returncode == 3
    assert result.stderr.startswith("assembly.py: error: ") and message in result.stderr
    assert "Traceback" not in result.stderr
    tasks = parse_trace((tmp_path / "results" / "pipeline_info" / "execution_trace.txt").read_text())
    assert [(task.name, task.status) for task in tasks] == [
        ("FETCH_READS (s1)", "COMPLETED"),
        ("READ_QC (s1)", "FAILED"),
    ]
    assert not (tmp_path / "results" / "contigs.fasta").exists()


def test_a_truncated_gzip_fails_clearly(tmp_path):
    rng = random.Random(7)
    records = "".join(f"@r{n}\n{''.join(rng.choices('ACGT', k=100))}\n+\n{'F' * 100}\n" for n in range(200))
    compressed = gzip.compress(records.encode())
    reads = tmp_path / "bad.fastq.gz"
    reads.write_bytes(compressed[: len(compressed) // 2])
    sheet = write_samplesheet(tmp_path / "samplesheet.csv", [("s1", "ERR1", str(reads), "")])

    result = assembly(sheet, tmp_path / "results")

    assert result.returncode == 3 and "not a readable FASTQ file" in result.stderr


def test_mates_with_different_read_counts_fail(tmp_path):
    one, two = tmp_path / "r_1.fastq", tmp_path / "r_2.fastq"
    one.write_text("@r1\nACGT\n+\nIIII\n@r2\nACGT\n+\nIIII\n")
    two.write_text("@r1\nACGT\n+\nIIII\n")
    sheet = write_samplesheet(tmp_path / "samplesheet.csv", [("s1", "ERR1", str(one), str(two))])

    result = assembly(sheet, tmp_path / "results")

    assert result.returncode == 3 and "run ERR1: fastq_1 has 2 reads, fastq_2 1" in result.stderr


def test_a_missing_read_url_fails_naming_it(ena, tmp_path):
    url = ena.fastq_url_prefix + "ftp.sra.ebi.ac.uk/vol1/fastq/ERR999/ERR9999999/ERR9999999_1.fastq.gz"
    sheet = write_samplesheet(tmp_path / "samplesheet.csv", [("s1", "ERR9999999", url, "")])

    result = assembly(sheet, tmp_path / "results")

    assert result.returncode == 3 and f"cannot fetch {url}: HTTP 404" in result.stderr


def test_a_samplesheet_with_the_wrong_header_fails(tmp_path):
    sheet = tmp_path / "samplesheet.csv"
    sheet.write_text("sample,fastq_1\ns1,reads.fastq\n")

    result = assembly(sheet, tmp_path / "results")

    assert result.returncode == 3 and "the header must be sample,run,fastq_1,fastq_2" in result.stderr


def test_an_even_k_is_refused(tmp_path):
    result = assembly(tmp_path / "samplesheet.csv", tmp_path / "results", "--k", "20")

    assert result.returncode == 2 and "--k must be odd" in result.stderr


def test_analysis_of_the_assembly_finds_genes_and_writes_a_trace(assembled, tmp_path):
    result = run_pipeline(
        "/usr/bin/python3", PIPELINES / "analysis.py", "--contigs", assembled / "contigs.fasta", "--outdir", tmp_path
    )

    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "analysis_summary.json").read_text())
    stats = json.loads((assembled / "assembly_stats.json").read_text())
    assert (summary["contigs"], summary["total_length"]) == (stats["contigs"], stats["total_length"])
    assert sum(summary["length_distribution"].values()) == summary["contigs"]
    assert 35 < summary["gc_percent"] < 65
    # The simulated genomes are dense with genes of 120-400 codons, so a gene finder finds many.
    assert summary["orfs"]["count"] >= 10 and summary["orfs"]["longest_aa"] >= 100
    proteins = (tmp_path / "predicted_orfs.faa").read_text()
    assert proteins.count(">") == summary["orfs"]["count"]
    sequences = ["".join(record.splitlines()[1:]) for record in proteins.split(">")[1:]]
    assert all(sequence.startswith("M") and "*" not in sequence and len(sequence) >= 100 for sequence in sequences)
    tasks = parse_trace((tmp_path / "pipeline_info" / "execution_trace.txt").read_text())
    assert [(task.name, task.status) for task in tasks] == [
        ("VALIDATE_CONTIGS", "COMPLETED"),
        ("PREDICT_ORFS", "COMPLETED"),
        ("SUMMARISE", "COMPLETED"),
    ]


@pytest.mark.parametrize(
    ("fasta", "message"),
    [
        ("", "no contigs"),
        ("ACGT\n", "sequence before the first '>' header"),
        (">c1\nACGT\n>c1\nACGT\n", "line 3: a duplicate contig name"),
        (">c1\nACGU\n", "line 2: not a nucleotide sequence"),
    ],
)
def test_analysis_of_bad_contigs_fails_clearly(tmp_path, fasta, message):
    contigs = tmp_path / "contigs.fasta"
    contigs.write_text(fasta)

    result = run_pipeline(
        "/usr/bin/python3", PIPELINES / "analysis.py", "--contigs", contigs, "--outdir", tmp_path / "out"
    )

    assert result.returncode == 1
    assert result.stderr.startswith("analysis.py: error: ") and message in result.stderr


def datamove(source: Path, destination: Path) -> subprocess.CompletedProcess:
    return run_pipeline("bash", PIPELINES / "datamove.sh", source, destination)


def make_results(path: Path, content: str = "contigs") -> Path:
    (path / "pipeline_info").mkdir(parents=True)
    (path / "contigs.fasta").write_text(content)
    (path / "pipeline_info" / "execution_trace.txt").write_text("task_id\tname\tstatus\n")
    return path


def test_datamove_copies_everything_with_a_verified_manifest(tmp_path):
    source = make_results(tmp_path / "work dir")
    destination = tmp_path / "results store" / "PRJEB40001" / "assembly"

    result = datamove(source, destination)

    assert result.returncode == 0, result.stderr
    assert (destination / "contigs.fasta").read_text() == "contigs"
    manifest = (destination / "MANIFEST.sha256").read_text().splitlines()
    assert [line.split("  ")[1] for line in manifest] == ["./contigs.fasta", "./pipeline_info/execution_trace.txt"]
    assert subprocess.run(["sha256sum", "-c", "--quiet", "MANIFEST.sha256"], cwd=destination).returncode == 0
    assert sorted(path.name for path in destination.parent.iterdir()) == ["assembly"]  # no temporary left behind


def test_datamove_replaces_changed_results_and_leaves_identical_ones(tmp_path):
    destination = tmp_path / "store" / "assembly"
    assert datamove(make_results(tmp_path / "first", "old"), destination).returncode == 0

    again = datamove(tmp_path / "first", destination)
    replaced = datamove(make_results(tmp_path / "second", "new"), destination)

    assert "already holds these results" in again.stdout
    assert replaced.returncode == 0 and (destination / "contigs.fasta").read_text() == "new"
    assert sorted(path.name for path in destination.parent.iterdir()) == ["assembly"]


def test_a_failed_copy_never_appears_in_the_store(tmp_path):
    source = make_results(tmp_path / "work")
    # Nextflow's publishDir may leave symlinks into the work directory; one that dangles cannot be copied.
    (source / "contigs.stats").symlink_to(tmp_path / "work-dir-already-cleaned")
    destination = tmp_path / "store" / "assembly"

    result = datamove(source, destination)

    assert result.returncode == 1 and f"datamove.sh: error: copying {source} failed" in result.stderr
    assert not destination.exists()
    assert list(destination.parent.iterdir()) == []


def test_datamove_refuses_a_missing_source(tmp_path):
    result = datamove(tmp_path / "nothing", tmp_path / "store")

    assert result.returncode == 1 and "source directory" in result.stderr and not (tmp_path / "store").exists()


def test_symlinked_results_are_copied_as_files(tmp_path):
    source = make_results(tmp_path / "work")
    (tmp_path / "published.txt").write_text("published")
    (source / "published.txt").symlink_to(tmp_path / "published.txt")
    destination = tmp_path / "store" / "assembly"

    assert datamove(source, destination).returncode == 0

    copied = destination / "published.txt"
    assert not copied.is_symlink() and copied.read_text() == "published"
    assert "./published.txt" in (destination / "MANIFEST.sha256").read_text()


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_datamove_of_named_files_copies_only_those_checked_against_their_recorded_sha256(tmp_path):
    work = make_results(tmp_path / "jobs" / "abc" / "results")
    (work.parent / ".emg").mkdir()
    (work.parent / ".emg" / "abc-1-1.42.log").write_text("a job log")
    (work / "stats.json").write_text("{}")
    destination = tmp_path / "store" / "request-1"

    result = run_pipeline(
        "bash",
        PIPELINES / "datamove.sh",
        "--files",
        destination,
        f"assembly/contigs.fasta:{sha256(work / 'contigs.fasta')}:{work / 'contigs.fasta'}",
        f"assembly/stats.json:{sha256(work / 'stats.json')}:{work / 'stats.json'}",
    )

    assert result.returncode == 0, result.stderr
    assert sorted(str(path.relative_to(destination)) for path in destination.rglob("*") if path.is_file()) == [
        "MANIFEST.sha256",
        "assembly/contigs.fasta",
        "assembly/stats.json",
    ]
    manifest = (destination / "MANIFEST.sha256").read_text().splitlines()
    assert [line.split("  ")[1] for line in manifest] == ["./assembly/contigs.fasta", "./assembly/stats.json"]
    assert subprocess.run(["sha256sum", "-c", "--quiet", "MANIFEST.sha256"], cwd=destination).returncode == 0


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../escape", "refusing the result name"),
        ("/etc/x", "refusing the result name"),
        ("MANIFEST.sha256", "refusing the result name"),
        ("contigs.fasta", "changed after its job ended"),
    ],
)
def test_datamove_of_named_files_refuses_a_changed_file_or_a_name_outside_the_destination(tmp_path, name, message):
    work = make_results(tmp_path / "work")
    recorded = sha256(work / "contigs.fasta")
    (work / "contigs.fasta").write_text("altered after the job ended")
    if message != "changed after its job ended":
        recorded = sha256(work / "contigs.fasta")
    destination = tmp_path / "store" / "request-1"

    result = run_pipeline(
        "bash", PIPELINES / "datamove.sh", "--files", destination, f"{name}:{recorded}:{work / 'contigs.fasta'}"
    )

    assert result.returncode == 1 and message in result.stderr
    assert not destination.exists() and list(destination.parent.iterdir()) == []


def test_the_pipelines_stand_alone_away_from_the_repository(tmp_path):
    """A copy of pipelines/ alone (as the slurm image holds it) runs: its trace writer comes with it,
    and nothing of the orchestrator is imported."""
    copy = shutil.copytree(PIPELINES, tmp_path / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    for script in ("assembly.py", "analysis.py"):
        result = run_pipeline("/usr/bin/python3", copy / script, "--help")
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout
    for source in copy.glob("*.py"):
        assert not re.search(
            r"^\s*(from|import)\s+(emg|flows|workers|slurm_adapter)\b", source.read_text(), re.MULTILINE
        ), source.name


def read_qc(run: str, outdir: Path, *fastqs) -> subprocess.CompletedProcess:
    reads = [part for fastq in fastqs for part in ("--fastq", fastq)]
    return run_pipeline("/usr/bin/python3", PIPELINES / "read_qc.py", "--run", run, *reads, "--outdir", outdir)


def served_reads(ena: FakeEnaServer, run: str) -> list[str]:
    # As ENA lays its FASTQ out: vol1/fastq/<first 6>/<0 + last 2 digits>/<run>/<run>_<mate>.fastq.gz
    [record] = httpx.get(
        f"{ena.base_url}/search",
        params={"result": "read_run", "query": 'study_accession="PRJEB40012"', "fields": "fastq_ftp", "format": "json"},
    ).json()[int(run[-2:]) - 1 : int(run[-2:])]
    assert record["run_accession"] == run
    return [ena.fastq_url_prefix + entry for entry in record["fastq_ftp"].split(";")]


def test_read_qc_measures_a_run_s_reads_from_the_served_files(ena, tmp_path):
    result = read_qc("ERR4801201", tmp_path / "qc", *served_reads(ena, "ERR4801201"))

    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "qc" / "qc_summary.json").read_text())
    assert (summary["run"], summary["reads"], summary["bases"], summary["mean_length"]) == (
        "ERR4801201",
        400,
        40_000,
        100,
    )
    # Simulated with 0.2% substitutions at Q10, every other base at Q37.
    assert summary["q30_percent"] > 99 and 36 < summary["mean_quality"] < 37
    assert 20 < summary["gc_percent"] < 80
    tasks = parse_trace((tmp_path / "qc" / "pipeline_info" / "execution_trace.txt").read_text())
    assert [(task.name, task.status) for task in tasks] == [
        ("FETCH_READS (ERR4801201)", "COMPLETED"),
        ("READ_QC (ERR4801201)", "COMPLETED"),
        ("QC_SUMMARY (ERR4801201)", "COMPLETED"),
    ]


def test_read_qc_of_a_degraded_run_reports_its_low_quality(ena, tmp_path):
    result = read_qc("ERR4801212", tmp_path / "qc", *served_reads(ena, "ERR4801212"))

    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "qc" / "qc_summary.json").read_text())
    assert 60 < summary["q30_percent"] < 80  # 30% of its bases at Q10


@pytest.mark.parametrize(
    ("mates", "message"),
    [
        (["@r1\nACGT\n+\nIIII\n@r2\nACGT\n+\nIIII\n", "@r1\nACGT\n+\nIIII\n"], "its mates hold different numbers"),
        (["@r1\nACGT\n+\nIII\n"], "sequence and quality differ in length (4 and 3)"),
        ([""], "no reads in"),
    ],
)
def test_read_qc_rejects_bad_reads_clearly(tmp_path, mates, message):
    paths = []
    for mate, text in enumerate(mates, start=1):
        path = tmp_path / f"r_{mate}.fastq"
        path.write_text(text)
        paths.append(path)

    result = read_qc("ERR1", tmp_path / "qc", *paths)

    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("read_qc.py: error: ") and message in result.stderr
    assert not (tmp_path / "qc" / "qc_summary.json").exists()
