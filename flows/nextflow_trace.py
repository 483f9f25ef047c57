"""Nextflow's execution trace file: parse it, summarise it, and write it.

The trace is the tab-separated table Nextflow writes with `-with-trace` (one row per task,
columns chosen by `trace.fields`). Values use Nextflow's own renderings, which this module
reads and writes exactly as `nextflow.util.Duration`, `nextflow.util.MemoryUnit` and
`nextflow.trace.TraceRecord` do:

- durations: `500ms`, `4.8s`, `1s`, `3m 30s`, `1h 2m 3s`, `1d 2h` (the `duration` and `realtime` columns);
- sizes: `0`, `512 B`, `4 KB`, `120.5 MB`, `1.2 GB`, powers of 1024 (`peak_rss`, `peak_vmem`, `rchar`, `wchar`);
- percentages: `95.2%` (`%cpu`);
- dates: `2024-01-15 10:23:45.123` (`submit`);
- `-` for a value that is not available.

Standard library only: the project's stand-in pipelines (pipelines/*.py) import the writing
half (`TaskRecorder`) when they run as Slurm jobs, outside the project's virtualenv, so one
module owns the format in both directions.
"""

import hashlib
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

NOT_AVAILABLE = "-"
DEFAULT_FIELDS = (
    "task_id", "hash", "native_id", "name", "status", "exit", "submit", "duration", "realtime",
    "%cpu", "peak_rss", "peak_vmem", "rchar", "wchar",
)
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
        remainder = remainder[match.end():].strip()
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


# --- writing ------------------------------------------------------------------------------------

def _round_half_up(value: float) -> int:
    """Java's Math.round, which Nextflow uses (Python's round() rounds halves to even)."""
    return int(value + 0.5)


def format_duration(seconds: float) -> str:
    """Nextflow's rendering: milliseconds under 1 s, one decimal under a minute, else `1h 2m 3s`."""
    millis = _round_half_up(seconds * 1000)
    if millis < 1_000:
        return f"{millis}ms"
    if millis < 60_000:
        return f"{_round_half_up(millis / 100) / 10:g}s"
    minutes, secs = divmod(_round_half_up(millis / 1000), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    return " ".join(f"{value}{unit}" for value, unit in parts if value)


def format_size(size_bytes: int) -> str:
    """Nextflow's rendering: `0`, else at most one decimal in the largest 1024-power unit."""
    if size_bytes <= 0:
        return "0"
    power = 0
    while size_bytes >= 1024 ** (power + 1) and power + 1 < len(SIZE_UNITS):
        power += 1
    return f"{round(size_bytes / 1024**power, 1):g} {SIZE_UNITS[power]}"


def format_percent(value: float) -> str:
    return f"{value:.1f}%"


def format_date(value: datetime) -> str:
    return value.strftime(DATE_FORMAT)[:-3]


def format_trace(rows: list[dict[str, object]]) -> str:
    """A trace file with DEFAULT_FIELDS from rows of typed values (None renders as `-`).

    Row keys are the column names; `submit` is a datetime, `duration`/`realtime` are seconds,
    `%cpu` is a percentage and the size columns are bytes.
    """
    formatters: dict[str, Callable[[Any], str]] = {
        "submit": format_date, "duration": format_duration, "realtime": format_duration,
        "%cpu": format_percent, "peak_rss": format_size, "peak_vmem": format_size,
        "rchar": format_size, "wchar": format_size,
    }
    lines = ["\t".join(DEFAULT_FIELDS)]
    for row in rows:
        cells = []
        for column in DEFAULT_FIELDS:
            value = row.get(column)
            render = formatters.get(column, str)
            cells.append(NOT_AVAILABLE if value is None else render(value))
        lines.append("\t".join(cells))
    return "\n".join(lines) + "\n"


# --- recording in-process tasks -------------------------------------------------------------------

def _proc_fields(path: str, names: tuple[str, ...]) -> dict[str, int]:
    """Integer fields of a /proc file such as /proc/self/status; empty where /proc is not readable."""
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in names:
            fields[key] = int(value.split()[0])
    return fields


def _process_counters() -> dict[str, int]:
    """The same /proc counters Nextflow's task wrapper reads: VmHWM/VmPeak (kB) and rchar/wchar (bytes)."""
    counters = _proc_fields("/proc/self/status", ("VmHWM", "VmPeak"))
    counters.update(_proc_fields("/proc/self/io", ("rchar", "wchar")))
    return counters


class TaskRecorder:
    """Runs steps of a stand-in pipeline as Nextflow "tasks" and keeps their trace file current.

    Each `with recorder.task("READ_QC (sample1)"):` block becomes one trace row with measured
    wall time, CPU share, peak memory and I/O. The file is rewritten after every task, as
    Nextflow appends a row when each task ends, so a pipeline that dies still leaves the rows
    of what it finished plus a FAILED row for the step that raised.
    """

    def __init__(self, trace_path, run_key: str):
        self.trace_path = trace_path
        self.run_key = run_key
        self.rows: list[dict[str, object]] = []
        # Under Slurm the job id is what an operator looks up; elsewhere the process id, as Nextflow's local executor.
        self.native_id = os.environ.get("SLURM_JOB_ID") or str(os.getpid())

    @contextmanager
    def task(self, name: str):
        submit = datetime.now()
        started, cpu_started = time.monotonic(), time.process_time()
        io_before = _process_counters()
        row: dict[str, object] = {
            "task_id": len(self.rows) + 1,
            "hash": self._hash(name),
            "native_id": self.native_id,
            "name": name,
            "submit": submit,
        }
        try:
            yield
            row.update(status="COMPLETED", exit=0)
        except BaseException:
            row.update(status="FAILED", exit=1)
            raise
        finally:
            row.update(self._measure(started, cpu_started, io_before))
            self.rows.append(row)
            self._write()

    def _hash(self, name: str) -> str:
        # Nextflow's hash names the task's work directory, e.g. `4e/1b2c3d`; the same task of a run keeps its hash.
        digest = hashlib.md5(f"{self.run_key}\0{name}".encode()).hexdigest()
        return f"{digest[:2]}/{digest[2:8]}"

    @staticmethod
    def _measure(started: float, cpu_started: float, io_before: dict[str, int]) -> dict[str, object]:
        # Both clocks read together, before the /proc reads below add time of their own.
        elapsed, cpu = time.monotonic() - started, time.process_time() - cpu_started
        counters = _process_counters()

        def kilobytes(key):
            return counters[key] * 1024 if key in counters else None

        def delta(key):
            return counters[key] - io_before[key] if key in counters and key in io_before else None

        return {
            "duration": elapsed,
            "realtime": elapsed,
            "%cpu": 100 * cpu / elapsed if elapsed > 0 else None,
            "peak_rss": kilobytes("VmHWM"),
            "peak_vmem": kilobytes("VmPeak"),
            "rchar": delta("rchar"),
            "wchar": delta("wchar"),
        }

    def _write(self) -> None:
        # Write then rename, so a reader never sees half a row.
        partial = f"{self.trace_path}.partial"
        with open(partial, "w") as handle:
            handle.write(format_trace(self.rows))
        os.replace(partial, self.trace_path)
