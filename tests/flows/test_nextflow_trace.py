"""The Nextflow trace parser, on trace files in Nextflow's real format (tests/flows/data/), and the
stand-in pipelines' own writer (pipelines/nextflow_trace.py), whose files the parser reads back."""

from datetime import datetime
from pathlib import Path

import pytest

from flows.nextflow_trace import parse_duration, parse_size, parse_trace, summarise
from pipelines.nextflow_trace import TaskRecorder, format_duration, format_size, format_trace

DATA = Path(__file__).parent / "data"
GB = 1024**3
MB = 1024**2


def load(name: str):
    return parse_trace((DATA / name).read_text())


def test_a_successful_run_parses_every_default_column():
    tasks = load("trace_success.txt")

    assert [task.task_id for task in tasks] == ["2", "1", "3", "4", "5"]  # file order, not task order
    megahit = tasks[2]
    assert megahit.name == "NFCORE_MAG:MAG:MEGAHIT (sample1)"
    assert (megahit.hash, megahit.native_id, megahit.status, megahit.exit) == ("91/d4b2e0", "4817261", "COMPLETED", 0)
    assert megahit.submit == datetime(2024, 3, 11, 9, 16, 19, 22000)
    assert megahit.duration_s == 3723
    assert megahit.realtime_s == 58 * 60 + 41
    assert megahit.cpu_percent == pytest.approx(1164.8)
    assert megahit.peak_rss_bytes == round(21.7 * GB)
    assert megahit.peak_vmem_bytes == round(24.2 * GB)
    assert megahit.rchar_bytes == round(9.8 * GB)
    assert megahit.wchar_bytes == round(612.5 * MB)
    assert tasks[3].duration_s == 0.5
    assert tasks[4].peak_rss_bytes == 0 and tasks[4].rchar_bytes == 512


def test_failed_cached_and_aborted_tasks_keep_their_status_and_dashes_become_none():
    tasks = {task.task_id: task for task in load("trace_failed_cached_aborted.txt")}

    assert tasks["1"].status == "CACHED" and tasks["1"].realtime_s == 118
    failed = tasks["5"]
    assert (failed.status, failed.exit) == ("FAILED", 137)
    assert failed.duration_s == 86400 + 2 * 3600 + 5 * 60
    aborted = tasks["7"]
    assert aborted.status == "ABORTED"
    assert aborted.native_id is None and aborted.exit is None and aborted.submit is None
    assert aborted.realtime_s is None and aborted.cpu_percent is None and aborted.peak_rss_bytes is None


def test_summary_counts_statuses_and_names_failed_tasks():
    summary = summarise(load("trace_failed_cached_aborted.txt"))

    assert summary["tasks"] == 6
    assert summary["by_status"] == {"CACHED": 2, "COMPLETED": 1, "FAILED": 1, "ABORTED": 2}
    assert summary["failed_tasks"] == ["NFCORE_MAG:MAG:MEGAHIT (sample2)"]
    assert summary["max_peak_rss_bytes"] == round(31.9 * GB)
    assert summary["total_realtime_s"] == pytest.approx(118 + 12.8 + 55.2 + 86400 + 3600 + 58 * 60 + 12)


def test_columns_are_found_by_the_header_so_extra_ones_are_ignored():
    [task] = load("trace_all_fields.txt")

    assert task.name == "EBI_METAGENOMICS_MIASSEMBLER:READS_QC:FASTP (ERR4800011)"
    assert task.native_id == "30571234"
    assert task.peak_rss_bytes == round(688.5 * MB)
    assert task.realtime_s == 68


def test_missing_optional_columns_are_none():
    [task] = parse_trace("task_id\tname\tstatus\n1\tASSEMBLE\tCOMPLETED\n")

    assert (task.name, task.status) == ("ASSEMBLE", "COMPLETED")
    assert task.exit is None and task.realtime_s is None and task.peak_rss_bytes is None


def test_a_header_alone_is_a_trace_of_no_tasks():
    assert parse_trace("task_id\thash\tname\tstatus\n") == []
    assert summarise([]) == {
        "tasks": 0,
        "by_status": {},
        "total_realtime_s": 0,
        "max_peak_rss_bytes": None,
        "failed_tasks": [],
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ((DATA / "not_a_trace.fasta").read_text(), "header lacks task_id, name, status"),
        ("task_id\tname\tstatus\n1\tASSEMBLE\n", "line 2 has 2 columns, the header 3"),
        ("task_id\tname\tstatus\n-\tASSEMBLE\tCOMPLETED\n", "line 2 has no task_id"),
        ((DATA / "trace_bad_duration.txt").read_text(), "line 2, column 'duration'"),
        ("task_id\tname\tstatus\tpeak_rss\n1\tX\tCOMPLETED\t12 parsecs\n", "column 'peak_rss'"),
        ("task_id\tname\tstatus\t%cpu\n1\tX\tCOMPLETED\t95.2\n", "column '%cpu'"),
    ],
)
def test_what_is_not_a_trace_raises_a_value_error_saying_where(text, message):
    with pytest.raises(ValueError, match="not a Nextflow trace") as raised:
        parse_trace(text)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0ms"),
        (0.5, "500ms"),
        (1.0, "1s"),
        (4.84, "4.8s"),
        (59.96, "60s"),
        (63, "1m 3s"),
        (3600, "1h"),
        (3723, "1h 2m 3s"),
        (93_780, "1d 2h 3m"),
    ],
)
def test_durations_render_as_nextflow_renders_them_and_parse_back(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(round(seconds, 1))


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0"),
        (512, "512 B"),
        (4096, "4 KB"),
        (126_353_408, "120.5 MB"),
        (3 * GB, "3 GB"),
    ],
)
def test_sizes_render_as_nextflow_renders_them_and_parse_back(size, text):
    assert format_size(size) == text
    assert parse_size(text) == size


def test_a_written_trace_parses_back_with_the_same_values():
    row = {
        "task_id": 1,
        "hash": "ab/cdef01",
        "native_id": "77",
        "name": "ASSEMBLE",
        "status": "COMPLETED",
        "exit": 0,
        "submit": datetime(2024, 1, 15, 10, 23, 45, 123000),
        "duration": 63.2,
        "realtime": 62.9,
        "%cpu": 95.24,
        "peak_rss": 120 * MB,
        "peak_vmem": None,
        "rchar": 2048,
        "wchar": 0,
    }

    text = format_trace([row])
    [task] = parse_trace(text)

    assert text.splitlines()[1].split("\t")[6:] == [
        "2024-01-15 10:23:45.123",
        "1m 3s",
        "1m 3s",
        "95.2%",
        "120 MB",
        "-",
        "2 KB",
        "0",
    ]
    assert (task.task_id, task.exit, task.submit, task.cpu_percent) == ("1", 0, row["submit"], 95.2)
    assert task.peak_rss_bytes == 120 * MB and task.peak_vmem_bytes is None


def test_the_recorder_writes_a_failed_row_for_the_step_that_raised(tmp_path):
    trace = tmp_path / "execution_trace.txt"
    recorder = TaskRecorder(trace, run_key="run-1")

    with recorder.task("FETCH_READS (s1)"):
        sum(range(10_000))
    with pytest.raises(RuntimeError), recorder.task("ASSEMBLE"):
        raise RuntimeError("out of k-mers")

    fetch, assemble = parse_trace(trace.read_text())
    assert (fetch.status, fetch.exit, assemble.status, assemble.exit) == ("COMPLETED", 0, "FAILED", 1)
    assert fetch.realtime_s is not None and fetch.peak_rss_bytes > 0
    assert fetch.hash != assemble.hash and len(fetch.hash) == 9


@pytest.mark.django_db
@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a trace at all\n",
        b"task_id\tname\tstatus\n1\tX\n",
        b"task_id\tname\tstatus\tduration\n1\tX\tCOMPLETED\tforever\n",
        b"\xff\xfe\x00garbage",
    ],
)
def test_a_malformed_trace_is_recorded_as_such_on_the_job_and_raises_nothing(tmp_path, content):
    from emg.models import ClusterJob
    from flows.analysis import TRACE_FILE, store_trace

    job = ClusterJob.objects.create(name="j", fingerprint="f" * 64, spec={})
    (tmp_path / TRACE_FILE).parent.mkdir(parents=True)
    (tmp_path / TRACE_FILE).write_bytes(content)

    store_trace(job, tmp_path)

    job.refresh_from_db()
    assert job.trace["error"].startswith(f"malformed Nextflow trace {tmp_path / TRACE_FILE}")
    assert job.trace["summary"] is None and job.trace["tasks"] == []
