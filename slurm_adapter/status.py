"""Parsing sacct and squeue output into JobStatus records."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

from .arrays import expand_task_ids, is_task_id
from .cluster import JobStatus, submitted_at, tag_from_comment
from .states import map_slurm_state

# Slurm commands run with TZ=UTC (see slurm.py), so their times are UTC. JobID, not JobIDRaw: an
# array task is "123_4" (its raw id is another number), the array's pending tasks "123_[5-199%20]".
SACCT_FIELDS = ("JobID", "State", "ExitCode", "Submit", "Start", "End", "Comment")
# squeue's counterpart: %i job id (as JobID), %T long state, %V submit, %S start, %e end, %k comment.
SQUEUE_FORMAT = "%i|%T|%V|%S|%e|%k"

# How far the controller's clock may be behind ours when we record a submit time.
CLOCK_SKEW = timedelta(minutes=5)

_NO_TIME = frozenset({"", "Unknown", "None", "N/A", "(null)"})


def parse_time(value: str) -> datetime | None:
    value = value.strip()
    if value in _NO_TIME:
        return None
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def parse_exit_code(value: str) -> tuple[int | None, int | None]:
    """Slurm's "<exit code>:<signal>" ("3:0", "0:9") as (exit_code, signal or None)."""
    code, sep, sig = value.strip().partition(":")
    if not code.isdigit() or (sep and not sig.isdigit()):
        return None, None
    signal = int(sig) if sep else 0
    return int(code), signal or None


def _parse_line(line: str, with_exit_code: bool) -> list[JobStatus]:
    """The job (or array task) a line describes; each task of an array's pending remainder
    ("123_[5-7]") as a record of its own; none for a line that is no job of ours to read."""
    n_fields = 7 if with_exit_code else 6
    # The comment is last, so a '|' inside it stays in it.
    parts = line.split("|", n_fields - 1)
    if len(parts) != n_fields:
        return []  # a comment's continuation line
    ids = expand_task_ids(parts[0])
    if not all(job_id.isdigit() or is_task_id(job_id) for job_id in ids):
        return []  # a step line, a het job line
    if with_exit_code:
        job_id, raw_state, exit_field, submit, start, end, comment = parts
    else:
        job_id, raw_state, submit, start, end, comment = parts
        exit_field = ""
    state = map_slurm_state(raw_state)
    exit_code, signal = parse_exit_code(exit_field) if state.is_final else (None, None)
    return [
        JobStatus(
            job_id=each,
            state=state,
            raw_state=raw_state,
            exit_code=exit_code,
            signal=signal,
            submit_time=parse_time(submit),
            start_time=parse_time(start),
            end_time=parse_time(end),
            tag=tag_from_comment(comment),
        )
        for each in ids
    ]


def parse_sacct(output: str) -> list[JobStatus]:
    """Parses `sacct --parsable2 --noheader -X -o <SACCT_FIELDS>` output."""
    return [status for line in output.splitlines() for status in _parse_line(line, True)]


def parse_squeue(output: str) -> list[JobStatus]:
    """Parses `squeue --noheader -o <SQUEUE_FORMAT>` output (no exit codes there)."""
    return [status for line in output.splitlines() for status in _parse_line(line, False)]


def pick_record(
    records: Sequence[JobStatus], submit_time: datetime | None, skew: timedelta = CLOCK_SKEW
) -> JobStatus | None:
    """Our record among those sharing one job id, or None if none can be ours.

    Slurm reuses ids (wrap-around, a reset controller), so a record submitted
    before our submission (less the allowed clock skew) belongs to another job.
    Of the rest the newest wins: a requeued job gets a new record.
    """
    if submit_time is not None:
        earliest = submit_time - skew
        records = [r for r in records if r.submit_time is None or r.submit_time >= earliest]
    return max(records, key=submitted_at, default=None)


def group_by_id(records: Iterable[JobStatus]) -> dict[str, list[JobStatus]]:
    grouped: dict[str, list[JobStatus]] = {}
    for record in records:
        grouped.setdefault(record.job_id, []).append(record)
    return grouped
