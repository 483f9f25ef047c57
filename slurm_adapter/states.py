"""Our job states and how every Slurm state maps onto them.

| Slurm state (long / short)  | ours          | why                                                        |
|-----------------------------|---------------|------------------------------------------------------------|
| PENDING / PD                | PENDING       |                                                            |
| CONFIGURING / CF            | PENDING       | resources allocated, but the user's script has not started |
| REQUEUED / RQ               | PENDING       | back in the queue; it will run again under the same id     |
| REQUEUE_HOLD / RH           | PENDING       | requeued and held, like a --hold job                       |
| REQUEUE_FED / RF            | PENDING       | requeued by the federation                                 |
| RESV_DEL_HOLD / RD          | PENDING       | held because its reservation was deleted; may be released  |
| RUNNING / R                 | RUNNING       |                                                            |
| COMPLETING / CG             | RUNNING       | the script ended, epilog still runs: not final yet         |
| RESIZING / RS               | RUNNING       |                                                            |
| SIGNALING / SI              | RUNNING       | being signalled; its outcome comes later                   |
| STAGE_OUT / SO              | RUNNING       | burst-buffer stage-out after the script                    |
| SUSPENDED / S               | SUSPENDED     |                                                            |
| STOPPED / ST                | SUSPENDED     | SIGSTOPped, resources kept                                 |
| COMPLETED / CD              | COMPLETED     |                                                            |
| FAILED / F                  | FAILED        |                                                            |
| SPECIAL_EXIT / SE           | FAILED        | held for an admin after a special exit; treat as failure   |
| CANCELLED / CA (+ " by N")  | CANCELLED     |                                                            |
| REVOKED / RV                | CANCELLED     | federation sibling revoked; it does not run here           |
| TIMEOUT / TO                | TIMEOUT       |                                                            |
| OUT_OF_MEMORY / OOM         | OUT_OF_MEMORY |                                                            |
| NODE_FAIL / NF              | NODE_FAIL     |                                                            |
| PREEMPTED / PR              | PREEMPTED     | final: a partition that requeues on preemption shows the   |
|                             |               | job as REQUEUED/PENDING instead, so PREEMPTED means it was |
|                             |               | cancelled (PreemptMode=CANCEL) and must be resubmitted     |
| BOOT_FAIL / BF              | BOOT_FAIL     |                                                            |
| DEADLINE / DL               | DEADLINE      |                                                            |

SUBMITTED (accepted, not yet in accounting) and LOST (gone from everywhere) are
ours only; Slurm never reports them.
"""

from __future__ import annotations

import enum
from typing import Literal

RetryKind = Literal["memory", "time", "as_is"]


class JobState(enum.StrEnum):
    SUBMITTED = "SUBMITTED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    LOST = "LOST"

    @property
    def is_final(self) -> bool:
        return self not in _ACTIVE

    @property
    def is_success(self) -> bool:
        return self is JobState.COMPLETED

    @property
    def retry_with(self) -> RetryKind | None:
        """How a retry should change the job: more memory, more time, or nothing."""
        return _RETRY.get(self)


_ACTIVE = frozenset({JobState.SUBMITTED, JobState.PENDING, JobState.RUNNING, JobState.SUSPENDED})

_RETRY: dict[JobState, RetryKind] = {
    JobState.OUT_OF_MEMORY: "memory",
    JobState.TIMEOUT: "time",
    JobState.NODE_FAIL: "as_is",
    JobState.PREEMPTED: "as_is",
    JobState.BOOT_FAIL: "as_is",
    JobState.LOST: "as_is",
}


class UnknownSlurmState(ValueError):
    def __init__(self, raw: str) -> None:
        super().__init__(f"unknown Slurm job state: {raw!r}")
        self.raw = raw


_SLURM_STATES: dict[str, JobState] = {}
for _long, _short, _ours in (
    ("PENDING", "PD", JobState.PENDING),
    ("CONFIGURING", "CF", JobState.PENDING),
    ("REQUEUED", "RQ", JobState.PENDING),
    ("REQUEUE_HOLD", "RH", JobState.PENDING),
    ("REQUEUE_FED", "RF", JobState.PENDING),
    ("RESV_DEL_HOLD", "RD", JobState.PENDING),
    ("RUNNING", "R", JobState.RUNNING),
    ("COMPLETING", "CG", JobState.RUNNING),
    ("RESIZING", "RS", JobState.RUNNING),
    ("SIGNALING", "SI", JobState.RUNNING),
    ("STAGE_OUT", "SO", JobState.RUNNING),
    ("SUSPENDED", "S", JobState.SUSPENDED),
    ("STOPPED", "ST", JobState.SUSPENDED),
    ("COMPLETED", "CD", JobState.COMPLETED),
    ("FAILED", "F", JobState.FAILED),
    ("SPECIAL_EXIT", "SE", JobState.FAILED),
    ("CANCELLED", "CA", JobState.CANCELLED),
    ("REVOKED", "RV", JobState.CANCELLED),
    ("TIMEOUT", "TO", JobState.TIMEOUT),
    ("OUT_OF_MEMORY", "OOM", JobState.OUT_OF_MEMORY),
    ("NODE_FAIL", "NF", JobState.NODE_FAIL),
    ("PREEMPTED", "PR", JobState.PREEMPTED),
    ("BOOT_FAIL", "BF", JobState.BOOT_FAIL),
    ("DEADLINE", "DL", JobState.DEADLINE),
):
    _SLURM_STATES[_long] = _SLURM_STATES[_short] = _ours


def map_slurm_state(raw: str) -> JobState:
    """Maps a state as sacct or squeue prints it ("CANCELLED by 0" included)."""
    # sacct appends " by <uid>" to CANCELLED; nothing else follows a state word.
    word = raw.strip().split(" ", 1)[0].upper()
    try:
        return _SLURM_STATES[word]
    except KeyError:
        raise UnknownSlurmState(raw) from None
