"""Writing Nextflow's execution trace file, for the stand-in pipelines (assembly.py, analysis.py).

The trace is the tab-separated table Nextflow writes with `-with-trace`, in its default columns
and its own renderings (`nextflow.util.Duration`, `nextflow.util.MemoryUnit`,
`nextflow.trace.TraceRecord`): durations `500ms`, `4.8s`, `1h 2m 3s`; sizes `0`, `512 B`,
`120.5 MB` (powers of 1024); percentages `95.2%`; dates `2024-01-15 10:23:45.123`; `-` for a
value that is not available.

Standard library only, and beside the pipelines, which import it as `nextflow_trace` (Python puts
a script's own directory on sys.path): they run as Slurm jobs with any python3 and import nothing
of the orchestrator. The orchestrator reads these files as it reads Nextflow's
(flows/nextflow_trace.py); tests/flows/test_nextflow_trace.py holds the two to one format.
"""

import hashlib
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime
from typing import Any

NOT_AVAILABLE = "-"
DEFAULT_FIELDS = (
    "task_id",
    "hash",
    "native_id",
    "name",
    "status",
    "exit",
    "submit",
    "duration",
    "realtime",
    "%cpu",
    "peak_rss",
    "peak_vmem",
    "rchar",
    "wchar",
)
DATE_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
SIZE_UNITS = ("B", "KB", "MB", "GB", "TB", "PB", "EB", "ZB")


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
        "submit": format_date,
        "duration": format_duration,
        "realtime": format_duration,
        "%cpu": format_percent,
        "peak_rss": format_size,
        "peak_vmem": format_size,
        "rchar": format_size,
        "wchar": format_size,
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
