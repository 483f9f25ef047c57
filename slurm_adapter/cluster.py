"""The interface every backend implements, and the records it returns."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from .spec import JobSpec
from .states import JobState

COMMENT_PREFIX = "emg:"


def job_comment(tag: str) -> str:
    """What marks a job as ours, and carries its tag (Slurm --comment)."""
    return COMMENT_PREFIX + tag


def tag_from_comment(comment: str | None) -> str | None:
    if comment and comment.startswith(COMMENT_PREFIX):
        return comment[len(COMMENT_PREFIX) :]
    return None


@dataclass(frozen=True)
class SubmittedJob:
    """A job as submitted. Slurm reuses ids, so (job_id, submit_time) is its identity."""

    job_id: str
    submit_time: datetime
    log_path: str


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: JobState
    raw_state: str
    exit_code: int | None
    signal: int | None
    submit_time: datetime | None
    start_time: datetime | None
    end_time: datetime | None
    tag: str | None


def submitted_at(status: JobStatus) -> datetime:
    return status.submit_time or datetime.min.replace(tzinfo=UTC)


def newest_first(statuses: Iterable[JobStatus]) -> list[JobStatus]:
    return sorted(statuses, key=submitted_at, reverse=True)


@dataclass(frozen=True)
class PartitionLimits:
    """The most one job may ask of a partition (None: no limit we know of)."""

    max_memory_mb: int | None
    max_time_minutes: int | None


class ClusterError(RuntimeError):
    """A scheduler command failed (not a job: the command itself). It may pass: a busy or
    unreachable controller, a timeout. A submission that failed so may have queued the job."""


class SubmissionRejected(ClusterError):
    """The scheduler refused the job for good (invalid partition, limits, account, QOS):
    submitting it again unchanged would be refused again. No job was queued."""


@runtime_checkable
class Cluster(Protocol):
    name: str
    # Whether it has `submit_array` (arrays.py): one submission for many jobs of one shape.
    supports_arrays: bool

    def submit(self, spec: JobSpec, tag: str) -> SubmittedJob: ...

    def query(self, jobs: Sequence[SubmittedJob]) -> dict[str, JobStatus]: ...

    def find_by_tag(
        self, tag: str, *, spec_name: str | None = None, since: datetime | None = None
    ) -> list[JobStatus]: ...

    def cancel(self, job_id: str) -> None: ...

    def active_jobs(self) -> list[JobStatus]: ...

    def partition_limits(self) -> dict[str | None, PartitionLimits]: ...

    def count_active(self) -> int: ...

    def tail_log(self, path: str, lines: int = 50) -> str: ...
