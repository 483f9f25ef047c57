"""Job arrays: many jobs of one shape in one submission, each task then read, logged and cancelled
as a job of its own, on the real cluster through both backends."""

from __future__ import annotations

from pathlib import Path

import pytest

from slurm_adapter import ArrayTask, JobSpec, JobState, parse_sacct
from slurm_adapter.arrays import array_range, expand_task_ids, parse_indices, write_array_files
from slurm_adapter.rest_api import Dialect
from slurm_adapter.slurm import check_job_id, selection_ids
from slurm_adapter.status import parse_squeue

ARRAY_OF_FOUR = "4"


def test_pending_remainders_of_an_array_read_as_one_id_per_task() -> None:
    assert expand_task_ids("123_[0-3%2]") == ["123_0", "123_1", "123_2", "123_3"]
    assert expand_task_ids("123_[1,4-5]") == ["123_1", "123_4", "123_5"]
    assert expand_task_ids("123_4") == ["123_4"] and expand_task_ids("123") == ["123"]
    assert parse_indices("0xE") == [1, 2, 3]  # slurmrestd's accounting: a hex bitmap
    assert parse_indices("1-3%20") == [1, 2, 3]
    with pytest.raises(ValueError):
        parse_indices("1-3;rm")


def test_sacct_and_squeue_lines_of_array_tasks_are_records_of_each_task() -> None:
    sacct = (
        "92_1|COMPLETED|0:0|2026-12-03T08:57:36|2026-12-03T08:57:37|2026-12-03T08:57:40|emg:array-7-1\n"
        "92_[2-3%2]|PENDING|0:0|2026-12-03T08:57:36|Unknown|Unknown|\n"
        "93|FAILED|3:0|2026-12-03T08:57:36|2026-12-03T08:57:37|2026-12-03T08:57:40|emg:abc-1-1\n"
        "94+0|RUNNING|0:0|2026-12-03T08:57:36|Unknown|Unknown|emg:abc-2-1\n"
    )
    records = {record.job_id: record for record in parse_sacct(sacct)}
    assert sorted(records) == ["92_1", "92_2", "92_3", "93"]  # the het job's line is no job of ours
    assert (records["92_1"].state, records["92_1"].exit_code, records["92_1"].tag) == (
        JobState.COMPLETED,
        0,
        "array-7-1",
    )
    assert records["92_3"].state is JobState.PENDING and records["92_3"].exit_code is None
    queued = parse_squeue("92_[4-5]|PENDING|2026-12-03T08:57:36|N/A|N/A|emg:array-7-1\n")
    assert [record.job_id for record in queued] == ["92_4", "92_5"]


def test_slurmrestd_records_of_array_tasks_carry_the_task_ids() -> None:
    old, new = Dialect("v0.0.38"), Dialect("v0.0.41")
    times = {"submission": 1796288280, "start": 0, "end": 0}
    task = {"job_id": 99, "array": {"job_id": 98, "task_id": 0, "task": None}, "state": {"current": "COMPLETED"}}
    pending = {"job_id": 98, "array": {"job_id": 98, "task_id": None, "task": "0xE"}, "state": {"current": "PENDING"}}
    alone = {"job_id": 97, "array": {"job_id": 0, "task_id": None, "task": None}, "state": {"current": "RUNNING"}}
    assert old.accounting_record({**task, "time": times}).job_id == "98_0"
    assert old.accounting_record({**pending, "time": times}).job_id == "98_[1,2,3]"
    assert old.accounting_record({**alone, "time": times}).job_id == "97"
    controller = {
        "job_id": 98,
        "array_job_id": {"set": True, "infinite": False, "number": 98},
        "array_task_id": {"set": False, "infinite": False, "number": 0},
        "array_task_string": "1-3",
        "job_state": ["PENDING"],
    }
    assert expand_task_ids(new.controller_record(controller).job_id) == ["98_1", "98_2", "98_3"]


def test_task_ids_are_job_ids_and_are_selected_by_their_array() -> None:
    assert check_job_id("123_4") == "123_4"
    for bad in ("123_", "_4", "123_[0-3]", "123 4"):
        with pytest.raises(ValueError):
            check_job_id(bad)
    assert selection_ids(["123_4", "123_5", "77", "124_0"]) == ["123", "77", "124"]


def test_a_flow_authors_array_option_is_refused_as_ours(spec) -> None:
    for option in ("--array=0-3", "--array", "--array=0-999%10"):
        with pytest.raises(ValueError, match="not allowed"):
            spec("true", extra_options=(option,))


def test_an_array_holds_jobs_of_one_shape_only(spec, tmp_path: Path) -> None:
    tasks = [ArrayTask(spec("true"), "abc-1-1"), ArrayTask(spec("true", memory_mb=200), "abc-2-1")]
    with pytest.raises(ValueError, match="same resources"):
        write_array_files(tasks, "array-1-1", str(tmp_path / "array"))
    assert array_range(200, 100) == "0-199%100" and array_range(200, None) == array_range(200, 500) == "0-199"


@pytest.mark.slurm
def test_an_array_is_one_submission_and_each_task_runs_its_own_command_in_its_own_dir(
    real_cluster, spec, tag, tmp_path: Path, wait_until
) -> None:
    hostile = 'it\'s "a" $(dir)'
    tasks = [
        ArrayTask(
            JobSpec(
                name=f"task {index}",
                command=("bash", "-c", 'echo "task $1 in $PWD"; [ "$1" != 2 ] || exit 3', "task", str(index)),
                work_dir=str(tmp_path / f"{hostile}-{index}"),
                memory_mb=100,
                time_limit_minutes=5,
            ),
            f"{tag[:50]}-{index}",
        )
        for index in range(int(ARRAY_OF_FOUR))
    ]
    real_cluster.calls.clear()
    submitted = real_cluster.submit_array(tasks, array_tag=tag, files_dir=str(tmp_path / "array"), max_running=2)
    [submissions] = [n for call, n in real_cluster.calls.items() if call in ("sbatch", "POST /slurm/job/submit")]
    assert submissions == 1
    [array_id] = {job.job_id.split("_")[0] for job in submitted}
    assert [job.job_id for job in submitted] == [f"{array_id}_{index}" for index in range(4)]

    def all_ended():
        statuses = real_cluster.query(submitted)
        return statuses if all(status.state.is_final for status in statuses.values()) else None

    statuses = wait_until(all_ended, timeout=120, message="every task of the array ended")
    assert {job_id: (status.state, status.exit_code) for job_id, status in statuses.items()} == {
        f"{array_id}_0": (JobState.COMPLETED, 0),
        f"{array_id}_1": (JobState.COMPLETED, 0),
        f"{array_id}_2": (JobState.FAILED, 3),
        f"{array_id}_3": (JobState.COMPLETED, 0),
    }
    assert {status.tag for status in statuses.values()} == {tag}
    for index, job in enumerate(submitted):
        log = wait_until(lambda job=job: real_cluster.tail_log(job.log_path), message=f"task {index}'s log")
        assert log == f"task {index} in {tmp_path}/{hostile}-{index}"
    found = real_cluster.find_by_tag(tag, spec_name="array")
    assert sorted(record.job_id for record in found) == sorted(job.job_id for job in submitted)


@pytest.mark.slurm
def test_pending_tasks_are_read_counted_and_cancelled_one_by_one(
    real_cluster, spec, tag, tmp_path: Path, wait_until
) -> None:
    tasks = [ArrayTask(spec("true", extra_options=("--hold",)), f"{tag[:50]}-{index}") for index in range(3)]
    submitted = real_cluster.submit_array(tasks, array_tag=tag, files_dir=str(tmp_path / "array"))
    try:

        def states() -> dict[str, JobState]:
            return {job_id: status.state for job_id, status in real_cluster.query(submitted).items()}

        # Held, the array is one pending record in Slurm: read as one pending task per job.
        wait_until(lambda: set(states().values()) == {JobState.PENDING}, timeout=60, message="three pending tasks")
        # Each pending task is an active job of its own (the cluster is shared: only ours are counted).
        assert sorted(r.job_id for r in real_cluster.active_jobs() if r.tag == tag) == [j.job_id for j in submitted]
        real_cluster.cancel(submitted[1].job_id)
        expected = {submitted[0].job_id: JobState.PENDING, submitted[1].job_id: JobState.CANCELLED}
        expected[submitted[2].job_id] = JobState.PENDING
        wait_until(lambda: states() == expected, timeout=60, message="only the task cancelled ended")
    finally:
        for job in submitted:
            real_cluster.cancel(job.job_id)
