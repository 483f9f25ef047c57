"""Nextflow's execution trace file: parse it and summarise it.

The trace is the tab-separated table Nextflow writes with `-with-trace` (one row per task,
columns chosen by `trace.fields`). Values use Nextflow's own renderings, which this module
reads and writes exactly as `nextflow.util.Duration`, `nextflow.util.MemoryUnit` and
`nextflow.trace.TraceRecord` do:

- durations: `500ms`, `4.8s`, `1s`, `3m 30s`, `1h 2m 3s`, `1d 2h` (the `duration` and `realtime` columns);
- sizes: `0`, `512 B`, `4 KB`, `120.5 MB`, `1.2 GB`, powers of 1024 (`peak_rss`, `peak_vmem`, `rchar`, `wchar`);
- percentages: `95.2%` (`%cpu`);
- dates: `2024-01-15 10:23:45.123` (`submit`);
- `-` for a value that is not available.

Written by Nextflow, or by the stand-in pipelines' own writer (pipelines/nextflow_trace.py, which
they carry so that they stand alone); tests/flows/test_nextflow_trace.py holds the two to one format.
"""

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

NOT_AVAILABLE = "-"
# Columns without which a row says nothing useful; any other column may be absent.
REQUIRED_FIELDS = ("task_id", "name", "status")
DATE_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
SIZE_UNITS = ("B", "KB", "MB", "GB", "TB", "PB", "EB", "ZB")
DURATION_UNITS_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
DURATION_PART = re.compile(r"(\d+(?:\.\d*)?)\s*(ms|s|m|h|d)\b")
SIZE_VALUE = re.compile(r"(\d+(?:\.\d*)?)\s*([KMGTPEZ]?B)?")


@dataclass(frozen=True)
class TraceTask:
    """One row of a trace file; None where Nextflow wrote `-` or the column is absent."""

    task_id: str
    hash: str | None
    native_id: str | None
    name: str
    status: str
    exit: int | None
    submit: datetime | None
    duration_s: float | None
    realtime_s: float | None
    cpu_percent: float | None
    peak_rss_bytes: int | None
    peak_vmem_bytes: int | None
    rchar_bytes: int | None
    wchar_bytes: int | None


# --- reading ------------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """Seconds in a Nextflow duration such as `1h 2m 3s`, `4.8s` or `500ms`."""
    remainder = text.strip()
    if not remainder:
        raise ValueError("not a Nextflow duration: empty value")
    total_ms = 0.0
    while remainder:
        match = DURATION_PART.match(remainder)
        if not match:
            raise ValueError(f"not a Nextflow duration: {text!r}")
        total_ms += float(match.group(1)) * DURATION_UNITS_MS[match.group(2)]
        remainder = remainder[match.end() :].strip()
    return total_ms / 1000


def parse_size(text: str) -> int:
    """Bytes in a Nextflow memory value such as `120.5 MB` (1 KB = 1024 B) or `0`."""
    match = SIZE_VALUE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a Nextflow size: {text!r}")
    power = SIZE_UNITS.index(match.group(2) or "B")
    return round(float(match.group(1)) * 1024**power)


def parse_percent(text: str) -> float:
    if not text.endswith("%"):
        raise ValueError(f"not a Nextflow percentage: {text!r}")
    return float(text[:-1])


def parse_date(text: str) -> datetime:
    return datetime.strptime(text, DATE_FORMAT)


# Column -> (TraceTask attribute, parser). Columns not listed here are ignored.
COLUMN_PARSERS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "exit": ("exit", int),
    "submit": ("submit", parse_date),
    "duration": ("duration_s", parse_duration),
    "realtime": ("realtime_s", parse_duration),
    "%cpu": ("cpu_percent", parse_percent),
    "peak_rss": ("peak_rss_bytes", parse_size),
    "peak_vmem": ("peak_vmem_bytes", parse_size),
    "rchar": ("rchar_bytes", parse_size),
    "wchar": ("wchar_bytes", parse_size),
}
TEXT_COLUMNS = ("task_id", "hash", "native_id", "name", "status")


def parse_trace(text: str) -> list[TraceTask]:
    """The tasks of a Nextflow trace file, in file order.

    Columns are found by the header, so extra columns (e.g. `workdir`, `%mem`) and missing
    optional ones are fine. Raises ValueError naming the line and column of anything that is
    not a trace: a missing header, a missing required column, a row of the wrong width, or a
    value not in Nextflow's format.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("not a Nextflow trace: the file is empty")
    header = lines[0].split("\t")
    missing = [name for name in REQUIRED_FIELDS if name not in header]
    if missing:
        raise ValueError(f"not a Nextflow trace: the header lacks {', '.join(missing)} (header: {lines[0][:200]!r})")
    return [_parse_row(header, line, number) for number, line in enumerate(lines[1:], start=2)]


def _parse_row(header: list[str], line: str, number: int) -> TraceTask:
    cells = line.split("\t")
    if len(cells) != len(header):
        raise ValueError(f"not a Nextflow trace: line {number} has {len(cells)} columns, the header {len(header)}")
    values: dict[str, Any] = {attribute: None for attribute, _ in COLUMN_PARSERS.values()}
    values.update(dict.fromkeys(TEXT_COLUMNS))
    for column, cell in zip(header, cells):
        if cell == NOT_AVAILABLE:
            continue
        if column in TEXT_COLUMNS:
            values[column] = cell
        elif column in COLUMN_PARSERS:
            attribute, parse = COLUMN_PARSERS[column]
            try:
                values[attribute] = parse(cell)
            except ValueError as error:
                raise ValueError(f"not a Nextflow trace: line {number}, column {column!r}: {error}") from None
    for name in REQUIRED_FIELDS:
        if values[name] is None:
            raise ValueError(f"not a Nextflow trace: line {number} has no {name}")
    return TraceTask(**values)


def summarise(tasks: list[TraceTask]) -> dict:
    """Figures worth keeping with a job: task counts by status, total realtime, peak memory, failures.

    Keys: `tasks` (int), `by_status` ({status: count}), `total_realtime_s` (float),
    `max_peak_rss_bytes` (int or None), `failed_tasks` ([name, ...] of FAILED tasks, in order).
    """
    peaks = [task.peak_rss_bytes for task in tasks if task.peak_rss_bytes is not None]
    return {
        "tasks": len(tasks),
        "by_status": dict(Counter(task.status for task in tasks)),
        "total_realtime_s": round(sum(task.realtime_s or 0.0 for task in tasks), 3),
        "max_peak_rss_bytes": max(peaks) if peaks else None,
        "failed_tasks": [task.name for task in tasks if task.status == "FAILED"],
    }
