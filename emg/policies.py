"""Resubmit policies: when an identical earlier cluster job is reused, and how a failed one is retried.

A policy is declared by the flow step that needs the job and stored with the job, so the
reconciler applies it and the admin shows it.
"""

import enum
from dataclasses import asdict, dataclass, replace
from typing import Any


class Reuse(enum.StrEnum):
    ANY = "any"  # reuse any earlier identical job, whatever its outcome
    IF_SUCCEEDED = "if_succeeded"  # reuse a completed one; resubmit if the last one failed
    NEVER = "never"  # always resubmit: for pipelines whose own resume (nextflow -resume) carries the work


@dataclass(frozen=True)
class ResubmitPolicy:
    reuse: Reuse = Reuse.IF_SUCCEEDED
    # An ended job older than this is not reused (None: no limit).
    max_age_seconds: int | None = None
    # Shell run before the job's command when an identical job ran before, e.g.
    # "nextflow clean -f || true". Written by developers in flow code, never taken from user input.
    prepare_on_resubmit: str | None = None
    # Attempts of one job, resubmissions after OUT_OF_MEMORY, TIMEOUT or node failures included.
    max_attempts: int = 3
    memory_factor: float = 2.0
    max_memory_mb: int = 256 * 1024
    time_factor: float = 2.0
    max_time_minutes: int = 7 * 24 * 60
    # Cancel the job once no live request waits for it (all cancelled or ended). False keeps an
    # expensive shared job running for requests to come, which will reuse it by fingerprint.
    cancel_when_unwanted: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "reuse", Reuse(self.reuse))
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.memory_factor < 1 or self.time_factor < 1:
            raise ValueError("escalation factors must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reuse": self.reuse.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ResubmitPolicy":
        return cls(**(data or {}))

    def with_changes(self, **changes: Any) -> "ResubmitPolicy":
        return replace(self, **changes)
