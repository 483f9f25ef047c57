"""What a finished job used, from `sacct`: CPU time, peak memory and wall time, against what it asked for.

Read from the job's allocation line (its elapsed time, CPUs, requested memory and time limit, and
its CPU time, which Slurm sums over the steps) and its steps' lines (peak memory is a step's figure:
the largest of them is the job's).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .arrays import is_task_id

# sacct --parsable2 --noheader (no -X: the steps carry MaxRSS) -o these, in this order.
# JobID, not JobIDRaw: an array task's lines are "123_4" and "123_4.batch".
USAGE_FIELDS = ("JobID", "ElapsedRaw", "TotalCPU", "MaxRSS", "AllocCPUS", "ReqMem", "TimelimitRaw")

_UNITS = {"": 1 / 1024, "K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 * 1024}


@dataclass(frozen=True)
class JobUsage:
    elapsed_s: float
    cpu_s: float
    cpus: int
    max_rss_mb: float | None
    requested_memory_mb: float | None
    time_limit_s: float | None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def parse_cpu_time(value: str) -> float | None:
    """sacct's TotalCPU: [D-][HH:]MM:SS[.mmm]."""
    value = value.strip()
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+(?:\.\d+)?)", value)
    if not match:
        return None
    days, hours, minutes, seconds = match.groups()
    return int(days or 0) * 86400 + int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)


def parse_memory_mb(value: str, cpus: int = 1) -> float | None:
    """MaxRSS or ReqMem ("3492K", "1.5G", "100M", older Slurm's "4Gn" per node / "2Gc" per CPU) in MB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)([nc]?)", value.strip())
    if not match:
        return None
    number, unit, per = match.groups()
    megabytes = float(number) * _UNITS[unit]
    return megabytes * cpus if per == "c" else megabytes


def _int(value: str) -> int | None:
    return int(value) if value.strip().isdigit() else None


def parse_usage(output: str) -> dict[str, JobUsage]:
    """Per job id, its usage; lines that cannot be read, and jobs with no allocation line, are left out."""
    jobs: dict[str, list[str]] = {}
    peaks: dict[str, float] = {}
    step_cpu: dict[str, float] = {}
    for line in output.splitlines():
        parts = line.split("|")
        if len(parts) != len(USAGE_FIELDS):
            continue
        raw_id = parts[0]
        job_id, _, step = raw_id.partition(".")
        if not (job_id.isdigit() or is_task_id(job_id)):
            continue
        if not step:
            jobs[job_id] = parts
            continue
        rss = parse_memory_mb(parts[3]) if parts[3] else None
        if rss is not None:
            peaks[job_id] = max(peaks.get(job_id, 0.0), rss)
        step_cpu[job_id] = step_cpu.get(job_id, 0.0) + (parse_cpu_time(parts[2]) or 0.0)
    found = {}
    for job_id, (_, elapsed, total_cpu, _rss, cpus, req_mem, limit) in jobs.items():
        n_cpus = _int(cpus) or 1
        minutes = _int(limit)
        found[job_id] = JobUsage(
            elapsed_s=float(_int(elapsed) or 0),
            cpu_s=max(parse_cpu_time(total_cpu) or 0.0, step_cpu.get(job_id, 0.0)),
            cpus=n_cpus,
            max_rss_mb=peaks.get(job_id),
            requested_memory_mb=parse_memory_mb(req_mem, n_cpus) if req_mem else None,
            time_limit_s=minutes * 60.0 if minutes is not None else None,
        )
    return found
