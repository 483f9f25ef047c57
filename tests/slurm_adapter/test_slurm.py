"""States only a real Slurm cluster produces, and the cost of querying it, through both of its backends:
Slurm's commands and slurmrestd."""

from __future__ import annotations

import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from slurm_adapter import ClusterError, JobState, SlurmCluster, SubmittedJob, make_cluster
from slurm_adapter.slurm import parse_sbatch_output

pytestmark = pytest.mark.slurm

# What each CLI command costs in slurmrestd requests.
_REST_CALL = {"sacct": "GET /slurmdb/jobs", "squeue": "GET /slurm/jobs"}


def _calls(cluster, rest: dict[str, int] | None = None, **commands: int) -> dict[str, int]:
    """The calls a backend should have made: CLI commands, or their REST counterparts."""
    if cluster.name != "slurmrestd":
        return commands
    return rest if rest is not None else {_REST_CALL[command]: n for command, n in commands.items()}


EATER = ("python3", "-c", "a = bytearray(600 * 1024 * 1024); import time; time.sleep(5)")


def test_held_job_is_pending(real_cluster, spec, tag, wait_for_state) -> None:
    job = real_cluster.submit(spec("true", extra_options=("--hold",)), tag)
    status = wait_for_state(real_cluster, job, {JobState.PENDING})
    assert (status.raw_state, status.exit_code, status.start_time) == ("PENDING", None, None)
    real_cluster.cancel(job.job_id)


def test_suspend_and_resume(real_cluster, slurm_cmd, spec, tag, wait_for_state) -> None:
    job = real_cluster.submit(spec("sleep", "300"), tag)
    wait_for_state(real_cluster, job, {JobState.RUNNING})
    slurm_cmd("scontrol", "suspend", job.job_id)
    assert wait_for_state(real_cluster, job, {JobState.SUSPENDED}).raw_state == "SUSPENDED"
    slurm_cmd("scontrol", "resume", job.job_id)
    wait_for_state(real_cluster, job, {JobState.RUNNING})
    real_cluster.cancel(job.job_id)


def test_slurm_refuses_to_requeue_our_jobs_so_it_never_runs_one_twice(
    real_cluster, slurm_cmd, spec, tag, wait_for_state
) -> None:
    """Submitted with --no-requeue: the reconciler owns retries, and even an admin's requeue is refused."""
    job = real_cluster.submit(spec("sleep", "300"), tag)
    wait_for_state(real_cluster, job, {JobState.RUNNING})
    refused = subprocess.run(["scontrol", "requeue", job.job_id], capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "disabled" in (refused.stdout + refused.stderr)
    assert wait_for_state(real_cluster, job, {JobState.RUNNING}).state is JobState.RUNNING
    real_cluster.cancel(job.job_id)


def test_node_failure_ends_the_job_because_slurm_never_requeues_ours(
    real_cluster, slurm_cmd, spec, tag, wait_for_state, wait_until
) -> None:
    """Jobs go in with --no-requeue (the reconciler owns retries), so a failed node ends the job.
    Through slurmrestd 22.05 too, whose submissions say so with `no_requeue` (requeue=false it ignores)."""
    expected = JobState.NODE_FAIL
    job = real_cluster.submit(spec("sleep", "300"), tag)
    wait_for_state(real_cluster, job, {JobState.RUNNING})
    try:
        slurm_cmd("scontrol", "update", "nodename=localhost", "state=down", "reason=slurm_adapter test")
        status = wait_for_state(real_cluster, job, {expected})
    finally:
        # ReturnToService=2 usually brings the node back by itself; resuming an idle node fails.
        subprocess.run(
            ["scontrol", "update", "nodename=localhost", "state=resume"], check=False, capture_output=True, timeout=30
        )
        wait_until(
            lambda: slurm_cmd("sinfo", "-h", "-n", "localhost", "-o", "%t").strip() in ("idle", "mix"),
            message="node back",
        )
    assert status.state.retry_with == "as_is"
    real_cluster.cancel(job.job_id)


def test_partition_limits_come_from_one_sinfo_or_two_requests(real_cluster) -> None:
    limits = real_cluster.partition_limits()

    assert real_cluster.calls == _calls(real_cluster, sinfo=1, rest={"GET /slurm/partitions": 1, "GET /slurm/nodes": 1})
    assert None in limits and limits[None].max_memory_mb and limits[None].max_memory_mb > 0
    assert set(limits) >= {"debug", "datamover"}
    assert limits == SlurmCluster().partition_limits()  # both backends read the same limits


def test_tag_lookup_selects_by_job_name_and_a_window_from_the_claim(real_cluster, spec, tag, wait_final) -> None:
    from datetime import UTC, datetime

    claimed = datetime.now(UTC)
    job = real_cluster.submit(spec("true"), tag)
    wait_final(real_cluster, job)
    real_cluster.calls.clear()

    found = real_cluster.find_by_tag(tag, spec_name=spec("true").name, since=claimed)

    assert [record.job_id for record in found] == [job.job_id]
    assert real_cluster.calls == _calls(real_cluster, sacct=1, squeue=1)


def test_out_of_memory(real_cluster, spec, tag, wait_final) -> None:
    job = real_cluster.submit(spec(*EATER, memory_mb=100), tag)
    status = wait_final(real_cluster, job)
    if Path("/sys/fs/cgroup/memory").is_dir():
        assert status.state is JobState.OUT_OF_MEMORY
        assert status.state.retry_with == "memory"
    else:  # without cgroups the accounting poller kills it
        assert (status.state, status.signal) == (JobState.FAILED, 9)


def test_preempted(real_cluster, slurm_cmd, spec, tag, wait_for_state, wait_final) -> None:
    cpus = int(slurm_cmd("sinfo", "-h", "-n", "localhost", "-o", "%c").strip())
    victim = real_cluster.submit(spec("sleep", "300", cpus=cpus), tag)
    wait_for_state(real_cluster, victim, {JobState.RUNNING})
    urgent = real_cluster.submit(spec("true", cpus=cpus, partition="urgent"), tag)
    status = wait_final(real_cluster, victim)
    assert (status.state, status.state.retry_with) == (JobState.PREEMPTED, "as_is")
    assert wait_final(real_cluster, urgent).state is JobState.COMPLETED


def test_killed_by_signal(real_cluster, spec, tag, wait_final) -> None:
    # Kills the batch script itself, not just a child whose death it would turn into an exit code.
    job = real_cluster.submit(spec("bash", "-c", "kill -9 $PPID"), tag)
    status = wait_final(real_cluster, job)
    assert (status.state, status.exit_code, status.signal) == (JobState.FAILED, 0, 9)


def test_missing_from_accounting_is_submitted_then_lost(real_cluster) -> None:
    now = datetime.now(UTC)
    fresh = SubmittedJob("99999998", now, "/nonexistent.log")
    old = SubmittedJob("99999999", now - timedelta(hours=2), "/nonexistent.log")
    result = real_cluster.query([fresh, old])
    assert (result[fresh.job_id].state, result[fresh.job_id].raw_state) == (JobState.SUBMITTED, "")
    assert (result[old.job_id].state, result[old.job_id].raw_state) == (JobState.LOST, "")
    assert real_cluster.calls == _calls(real_cluster, sacct=1, squeue=1)


def test_a_reused_id_is_not_our_job(real_cluster, spec, tag, wait_final) -> None:
    """A record submitted before our submission belongs to an earlier job with the same id."""
    real = wait_final(real_cluster, real_cluster.submit(spec("true"), tag))
    ours = SubmittedJob(real.job_id, datetime.now(UTC) + timedelta(hours=1), "/x.log")
    assert real_cluster.query([ours])[real.job_id].state is JobState.SUBMITTED


def test_cancel_unknown_job_is_not_an_error(real_cluster) -> None:
    real_cluster.cancel("99999997")
    with pytest.raises(ValueError):
        real_cluster.cancel("12; rm -rf /")


def test_500_held_jobs_in_one_query(real_cluster, spec, tag) -> None:
    jobs = [real_cluster.submit(spec("true", extra_options=("--hold",)), tag) for _ in range(500)]
    try:
        real_cluster.calls.clear()
        result = real_cluster.query(jobs)
        assert set(result) == {j.job_id for j in jobs}
        assert {s.state for s in result.values()} <= {JobState.PENDING, JobState.SUBMITTED}
        assert sum(real_cluster.calls.values()) <= 2
    finally:
        subprocess.run(["scancel", *(j.job_id for j in jobs)], check=True, timeout=120)


def test_min_query_interval_is_honoured(slurm_up) -> None:
    cluster = SlurmCluster(min_query_interval_s=0.5)
    job = SubmittedJob("99999996", datetime.now(UTC), "/x.log")
    started = time.monotonic()
    cluster.query([job])
    cluster.query([job])
    assert time.monotonic() - started >= 0.5
    assert cluster.query([]) == {}


def test_sbatch_output_and_factory(tmp_path: Path) -> None:
    assert parse_sbatch_output("123\n") == "123"
    assert parse_sbatch_output("123;emg\n") == "123"
    with pytest.raises(ClusterError):
        parse_sbatch_output("sbatch: error: Batch job submission failed")
    assert make_cluster("slurm").name == "slurm"
    assert make_cluster("local", root_dir=str(tmp_path)).name == "local"
    assert make_cluster("auto", root_dir=str(tmp_path)).name in ("slurm", "local")
    with pytest.raises(ValueError):
        make_cluster("pbs")
