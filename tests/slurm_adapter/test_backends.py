"""The same behaviour on both backends: real Slurm jobs and local processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_adapter import JobState


def test_completed(cluster, spec, tag, wait_until, wait_final) -> None:
    job = cluster.submit(spec("echo", "hello"), tag)
    status = wait_final(cluster, job)
    assert (status.state, status.exit_code, status.signal, status.tag) == (JobState.COMPLETED, 0, None, tag)
    assert status.state.is_success
    assert status.start_time is not None and status.end_time is not None and status.submit_time is not None
    assert status.end_time.tzinfo is not None
    assert wait_until(lambda: cluster.tail_log(job.log_path), message="log") == "hello"


def test_failed_with_exit_code(cluster, spec, tag, wait_until, wait_final) -> None:
    job = cluster.submit(spec("bash", "-c", "echo failing; exit 3"), tag)
    status = wait_final(cluster, job)
    assert (status.state, status.exit_code, status.signal) == (JobState.FAILED, 3, None)
    assert status.state.retry_with is None


def test_cancelled(cluster, spec, tag, wait_for_state, wait_final) -> None:
    job = cluster.submit(spec("sleep", "300"), tag)
    wait_for_state(cluster, job, {JobState.RUNNING})
    cluster.cancel(job.job_id)
    status = wait_final(cluster, job)
    assert status.state is JobState.CANCELLED
    cluster.cancel(job.job_id)  # already finished: not an error


def test_found_by_tag_alone(cluster, spec, tag, wait_until, wait_final) -> None:
    first = cluster.submit(spec("true"), tag)
    second = cluster.submit(spec("true"), tag)
    other = cluster.submit(spec("true"), tag + "-other")

    def both_found():
        found = cluster.find_by_tag(tag)
        return found if {s.job_id for s in found} == {first.job_id, second.job_id} else None

    found = wait_until(both_found, message="jobs by tag")
    assert found[0].submit_time >= found[1].submit_time
    assert all(s.tag == tag for s in found)
    assert other.job_id not in {s.job_id for s in found}


def test_hostile_names_and_arguments_run_literally(cluster, spec, tag, wait_until, wait_final, tmp_path: Path) -> None:
    work = tmp_path / 'it\'s a "dir" $(x)'
    values = ("$(touch subst-marker)", "`touch backtick-marker`", "a; touch semicolon-marker", 'it\'s "quoted"', "*")
    job = cluster.submit(
        spec(
            "printf",
            "[%s]\n",
            *values,
            name="we|ird\nname \"double\" 'single' $(touch name-marker)",
            work_dir=str(work),
            environment={"SPICY": "$(touch env-marker) `x` ;"},
        ),
        tag,
    )
    status = wait_final(cluster, job)
    assert status.state is JobState.COMPLETED
    assert cluster.tail_log(job.log_path) == "\n".join(f"[{v}]" for v in values)
    leftovers = [p.name for p in tmp_path.rglob("*marker*")]
    assert leftovers == []


def test_environment_is_only_the_allowlist(
    cluster, spec, tag, wait_until, wait_final, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMG_SUBMITTER_SECRET", "must-not-leak")
    job = cluster.submit(
        spec(
            "bash",
            "-c",
            'echo "FOO=$FOO"; echo "SECRET=${EMG_SUBMITTER_SECRET:-unset}"; command -v ls',
            environment={"FOO": "a b $HOME"},
        ),
        tag,
    )
    assert wait_final(cluster, job).state is JobState.COMPLETED
    assert cluster.tail_log(job.log_path).splitlines() == ["FOO=a b $HOME", "SECRET=unset", "/usr/bin/ls"]


def test_script_and_work_dir_are_created(cluster, spec, tag, wait_until, wait_final, tmp_path: Path) -> None:
    work = tmp_path / "deep" / "new"
    job = cluster.submit(spec("pwd", work_dir=str(work)), tag)
    assert wait_final(cluster, job).state is JobState.COMPLETED
    assert cluster.tail_log(job.log_path) == str(work)
    [script] = [p for p in (work / ".emg").glob(f"{tag}.*") if not p.name.endswith(".log")]
    assert script.read_text().startswith("#!/bin/bash\nset -euo pipefail\n")


def test_count_active_counts_our_running_jobs(cluster, spec, tag, wait_until) -> None:
    before = cluster.count_active()
    jobs = [cluster.submit(spec("sleep", "300"), tag) for _ in range(2)]
    wait_until(lambda: cluster.count_active() >= before + 2, message="two more active jobs")
    for job in jobs:
        cluster.cancel(job.job_id)
    wait_until(lambda: all(s.state.is_final for s in cluster.query(jobs).values()), message="cancellation")
    assert cluster.count_active() <= before


def test_invalid_tag_rejected(cluster, spec) -> None:
    for bad in ("Upper", "", "x" * 65, "semi;colon", "emg:x"):
        with pytest.raises(ValueError):
            cluster.submit(spec("true"), bad)


@pytest.mark.slow
@pytest.mark.slurm
def test_a_job_over_its_time_limit_ends_timeout_and_asks_for_more_time_on_every_backend(
    slurm_cluster, slurmrestd_cluster, local_cluster, spec, tag, wait_final
) -> None:
    # A time limit is a whole minute: one job on each backend, submitted together, share the wait.
    clusters = {"s": slurm_cluster, "r": slurmrestd_cluster, "l": local_cluster}
    jobs = {
        name: cluster.submit(spec("sleep", "600", time_limit_minutes=1), f"{tag}-{name}")
        for name, cluster in clusters.items()
    }
    for name, cluster in clusters.items():
        status = wait_final(cluster, jobs[name], timeout=150)
        assert (status.state, status.state.retry_with) == (JobState.TIMEOUT, "time"), type(cluster).__name__


def test_local_job_survives_its_orchestrator(local_cluster, spec, tag, wait_until) -> None:
    """A submitter that exits (crashes) right after submitting leaves a job that still completes."""
    code = (
        "import json, sys; from slurm_adapter import LocalCluster, JobSpec; "
        "c = LocalCluster(sys.argv[1]); j = c.submit(JobSpec.from_dict(json.loads(sys.argv[2])), sys.argv[3]); "
        "print(j.job_id); import os; os._exit(0)"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(local_cluster.root),
            json.dumps(spec("bash", "-c", "sleep 1; exit 4").to_dict()),
            tag,
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout.strip()
    [found] = local_cluster.find_by_tag(tag)
    assert found.job_id == out and found.state is JobState.RUNNING
    status = wait_until(lambda: (s := local_cluster.find_by_tag(tag)[0]).state.is_final and s, message="local job end")
    assert (status.state, status.exit_code) == (JobState.FAILED, 4)
    assert os.path.exists(local_cluster.root / out / "exit.json")
