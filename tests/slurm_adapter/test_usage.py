"""Reading what a job used from sacct's output: its allocation line and its steps'."""

import pytest

from slurm_adapter import JobUsage, parse_usage
from slurm_adapter.usage import parse_cpu_time, parse_memory_mb

# sacct --parsable2 --noheader -o JobIDRaw,ElapsedRaw,TotalCPU,MaxRSS,AllocCPUS,ReqMem,TimelimitRaw
OUTPUT = """\
620|125|03:20.500||4|2G|60
620.batch|125|03:20.000|812.5M|4||
620.extern|125|00:00.500|1240K|4||
621|7200|1-02:03:04||2|100Mc|Partition_Limit
621.batch|7200|1-02:03:04|3G|2||
622|0|00:00:00||1|100M|5
not a line
623.batch|5|00:01.000|2M|1||
"""


def test_a_jobs_usage_is_its_allocation_line_with_the_peak_of_its_steps():
    usage = parse_usage(OUTPUT)

    assert usage["620"] == JobUsage(
        elapsed_s=125, cpu_s=200.5, cpus=4, max_rss_mb=812.5, requested_memory_mb=2048, time_limit_s=3600
    )
    # Memory asked per CPU is for all of them; a limit sacct does not give in minutes is unknown.
    assert usage["621"] == JobUsage(
        elapsed_s=7200, cpu_s=93784, cpus=2, max_rss_mb=3072, requested_memory_mb=200, time_limit_s=None
    )
    assert usage["622"].max_rss_mb is None  # no step recorded yet
    assert "623" not in usage  # a step without its allocation line


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("00:00.004", 0.004),
        ("03:20.500", 200.5),
        ("01:02:03", 3723),
        ("2-00:00:01", 172801),
        ("", None),
        ("INVALID", None),
    ],
)
def test_cpu_times_in_every_form_sacct_prints(text, seconds):
    assert parse_cpu_time(text) == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize(
    ("text", "megabytes"),
    [("1024K", 1), ("1.5G", 1536), ("100M", 100), ("4Gn", 4096), ("512", 0.5), ("", None), ("lots", None)],
)
def test_memory_in_every_unit_sacct_prints(text, megabytes):
    assert parse_memory_mb(text) == megabytes
