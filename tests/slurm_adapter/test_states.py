from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from slurm_adapter import JobState, UnknownSlurmState, map_slurm_state, parse_exit_code, parse_sacct
from slurm_adapter.status import parse_squeue, pick_record

DATA = Path(__file__).parent / "data"

SLURM_STATES = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "SUSPENDED": JobState.SUSPENDED,
    "STOPPED": JobState.SUSPENDED,
    "COMPLETED": JobState.COMPLETED,
    "FAILED": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED,
    "CANCELLED by 0": JobState.CANCELLED,
    "CANCELLED by 1000": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
    "TIMEOUT": JobState.TIMEOUT,
    "OUT_OF_MEMORY": JobState.OUT_OF_MEMORY,
    "NODE_FAIL": JobState.NODE_FAIL,
    "PREEMPTED": JobState.PREEMPTED,
    "BOOT_FAIL": JobState.BOOT_FAIL,
    "DEADLINE": JobState.DEADLINE,
    # squeue %t short forms
    "PD": JobState.PENDING,
    "R": JobState.RUNNING,
    "CG": JobState.RUNNING,
    "CD": JobState.COMPLETED,
    "CA": JobState.CANCELLED,
    "OOM": JobState.OUT_OF_MEMORY,
    "TO": JobState.TIMEOUT,
    "NF": JobState.NODE_FAIL,
    "PR": JobState.PREEMPTED,
    "SE": JobState.FAILED,
}


@pytest.mark.parametrize(("raw", "expected"), SLURM_STATES.items())
def test_every_slurm_state_maps(raw: str, expected: JobState) -> None:
    assert map_slurm_state(raw) is expected


@pytest.mark.parametrize("raw", ["", "BOGUS", "RUNNING_LATE", "CANCEL"])
def test_unknown_state_raises_with_raw_text(raw: str) -> None:
    with pytest.raises(UnknownSlurmState) as err:
        map_slurm_state(raw)
    assert err.value.raw == raw
    assert isinstance(err.value, ValueError)


def test_final_success_and_retry_properties() -> None:
    active = {JobState.SUBMITTED, JobState.PENDING, JobState.RUNNING, JobState.SUSPENDED}
    assert {s for s in JobState if not s.is_final} == active
    assert [s for s in JobState if s.is_success] == [JobState.COMPLETED]
    assert JobState.OUT_OF_MEMORY.retry_with == "memory"
    assert JobState.TIMEOUT.retry_with == "time"
    for s in (JobState.NODE_FAIL, JobState.PREEMPTED, JobState.BOOT_FAIL, JobState.LOST):
        assert s.retry_with == "as_is"
    assert JobState.FAILED.retry_with is None and JobState.COMPLETED.retry_with is None
    assert JobState("OUT_OF_MEMORY") is JobState.OUT_OF_MEMORY


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("0:0", (0, None)),
        ("3:0", (3, None)),
        ("0:9", (0, 9)),
        ("0:125", (0, 125)),
        ("255:0", (255, None)),
        ("", (None, None)),
    ],
)
def test_exit_code_and_signal(field: str, expected: tuple[int | None, int | None]) -> None:
    assert parse_exit_code(field) == expected


def test_recorded_sacct_lines() -> None:
    by_id = {s.job_id: s for s in parse_sacct((DATA / "sacct_recorded.txt").read_text())}
    assert (by_id["3"].state, by_id["3"].exit_code, by_id["3"].signal, by_id["3"].tag) == (
        JobState.FAILED,
        3,
        None,
        "t1",
    )
    assert (by_id["4"].state, by_id["4"].exit_code, by_id["4"].signal) == (JobState.FAILED, 0, 9)
    assert by_id["5"].state is JobState.CANCELLED and by_id["5"].raw_state == "CANCELLED by 0"
    assert by_id["5"].start_time is None
    assert by_id["13"].state is JobState.OUT_OF_MEMORY
    assert by_id["14"].state is JobState.COMPLETED and by_id["14"].exit_code == 0
    assert by_id["14"].start_time == datetime(2026, 11, 27, 1, 11, 45, tzinfo=UTC)
    assert by_id["16"].state is JobState.PREEMPTED
    held = by_id["37"]
    assert (held.state, held.exit_code, held.start_time, held.tag) == (JobState.PENDING, None, None, "held-one")


def test_step_lines_and_pipes_in_comment() -> None:
    output = (
        "7|COMPLETED|0:0|2026-11-27T01:11:11|2026-11-27T01:11:11|2026-11-27T01:11:12|emg:a|b\n"
        "7.batch|COMPLETED|0:0|2026-11-27T01:11:11|2026-11-27T01:11:11|2026-11-27T01:11:12|\n"
        "continuation of a comment with a newline\n"
    )
    [record] = parse_sacct(output)
    assert record.tag == "a|b"


def test_squeue_lines() -> None:
    [record] = parse_squeue("37|PENDING|2026-11-27T01:13:15|N/A|N/A|(null)\n")
    assert (record.state, record.exit_code, record.tag, record.start_time) == (JobState.PENDING, None, None, None)


def test_pick_record_prefers_ours_over_a_reused_id() -> None:
    ours = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    old = f"9|COMPLETED|0:0|{(ours - timedelta(days=3)).strftime('%Y-%m-%dT%H:%M:%S')}|None|None|\n"
    mine = f"9|RUNNING|0:0|{ours.strftime('%Y-%m-%dT%H:%M:%S')}|None|None|emg:x\n"
    records = parse_sacct(old + mine)
    assert pick_record(records, ours).state is JobState.RUNNING
    assert pick_record(records[:1], ours) is None
    assert pick_record(records, None).state is JobState.RUNNING


@pytest.mark.parametrize(
    ("stderr", "permanent"),
    [
        ("sbatch: error: Batch job submission failed: Invalid partition name specified", True),
        ("sbatch: error: Batch job submission failed: Requested node configuration is not available", True),
        (
            "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
            True,
        ),
        (
            "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit, user's size "
            "and/or time limits)",
            False,
        ),
        ("sbatch: error: Batch job submission failed: Socket timed out on send/recv operation", False),
        ("sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)", False),
        ("sbatch did not answer within 60.0s", False),
    ],
)
def test_sbatch_refusals_are_told_apart_from_errors_that_may_pass(stderr: str, permanent: bool) -> None:
    from slurm_adapter.slurm import is_permanent_sbatch_error

    assert is_permanent_sbatch_error(stderr) is permanent


def test_a_job_held_for_a_deleted_reservation_is_pending() -> None:
    assert map_slurm_state("RESV_DEL_HOLD") is JobState.PENDING
    assert map_slurm_state("RD") is JobState.PENDING
