"""Efficiency of ended cluster jobs: what they used against what they asked for.

CPU: the job's CPU time against its CPUs x its wall time; memory: its peak resident memory against
the memory it requested; time: its wall time against its time limit. Clusters queue and bill by
what is requested, so a job using well under it (below EMG_EFFICIENCY_THRESHOLD) is flagged, and
the summary per pipeline step says what its jobs really needed, to right-size their resources.
"""

import statistics
from dataclasses import dataclass

from django.conf import settings


@dataclass(frozen=True)
class Efficiency:
    cpu: float | None
    memory: float | None
    time: float | None
    usage: dict

    @property
    def flags(self) -> list[str]:
        threshold = settings.EMG_EFFICIENCY_THRESHOLD
        return [
            name
            for name, ratio in (("CPU", self.cpu), ("memory", self.memory), ("time", self.time))
            if ratio is not None and ratio < threshold
        ]


def ratio(used: float | None, of: float | None) -> float | None:
    if used is None or not of:
        return None
    return used / of


def efficiency(usage: dict | None) -> Efficiency | None:
    """From a job's recorded usage (slurm_adapter.JobUsage as a dict); None if none was recorded."""
    if not isinstance(usage, dict) or "elapsed_s" not in usage:
        return None  # none recorded, or recorded as unavailable from accounting
    elapsed = usage.get("elapsed_s") or 0
    return Efficiency(
        cpu=ratio(usage.get("cpu_s"), (usage.get("cpus") or 1) * elapsed),
        memory=ratio(usage.get("max_rss_mb"), usage.get("requested_memory_mb")),
        time=ratio(elapsed, usage.get("time_limit_s")),
        usage=usage,
    )


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


@dataclass(frozen=True)
class StepSummary:
    step: str
    jobs: int
    flagged: int
    cpu_median: float | None
    memory_median: float | None
    memory_peak_mb: float | None
    memory_requested_mb: float | None
    time_median: float | None
    elapsed_max_s: float | None


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarise(step: str, efficiencies: list[Efficiency]) -> StepSummary:
    peaks: list[float] = [e.usage["max_rss_mb"] for e in efficiencies if e.usage.get("max_rss_mb") is not None]
    requested: list[float] = [
        e.usage["requested_memory_mb"] for e in efficiencies if e.usage.get("requested_memory_mb")
    ]
    elapsed: list[float] = [e.usage["elapsed_s"] for e in efficiencies if e.usage.get("elapsed_s") is not None]
    return StepSummary(
        step=step,
        jobs=len(efficiencies),
        flagged=sum(1 for e in efficiencies if e.flags),
        cpu_median=median([e.cpu for e in efficiencies]),
        memory_median=median([e.memory for e in efficiencies]),
        memory_peak_mb=max(peaks) if peaks else None,
        memory_requested_mb=max(requested) if requested else None,
        time_median=median([e.time for e in efficiencies]),
        elapsed_max_s=max(elapsed) if elapsed else None,
    )


@dataclass(frozen=True)
class TaskShare:
    """One Nextflow task's use of its job's request: CPU (its %cpu over the job's CPUs) and peak memory."""

    name: str
    cpu: float | None
    memory: float | None


def task_shares(trace: dict | list | None, spec: dict) -> list[TaskShare]:
    """Per task of the job's Nextflow trace, what it used of what the job requested.

    sacct sees the job as a whole; the trace says which task needed the memory or kept the CPUs
    busy, so a step's request can be sized for its largest task rather than guessed."""
    tasks = trace.get("tasks") if isinstance(trace, dict) else trace
    if not isinstance(tasks, list):
        return []
    cpus = spec.get("cpus") or 1
    memory_bytes = (spec.get("memory_mb") or 0) * 1024 * 1024
    shares = []
    for task in tasks:
        if not isinstance(task, dict):
            continue
        cpu_percent, peak = task.get("cpu_percent"), task.get("peak_rss_bytes")
        shares.append(
            TaskShare(
                name=str(task.get("name") or task.get("task_id") or "?"),
                cpu=None if cpu_percent is None else cpu_percent / 100 / cpus,
                memory=ratio(peak, memory_bytes),
            )
        )
    return shares


def largest_task(shares: list[TaskShare]) -> TaskShare | None:
    """The task with the highest peak memory: what the job's memory request must cover."""
    measured = [share for share in shares if share.memory is not None]
    return max(measured, key=lambda share: share.memory or 0.0) if measured else None
