"""The Slurm fault shim, on the real cluster: it passes through, stalls, fails, alters and logs as told."""

import os
import subprocess
import time
import uuid

import pytest

from devstack.processes import wait_until
from tests.slurm_faults import BIN_DIR, SlurmFaults

pytestmark = [pytest.mark.slurm]


@pytest.fixture
def faults(tmp_path, slurm_cluster) -> SlurmFaults:
    return SlurmFaults(tmp_path / "faults")


@pytest.fixture
def comment() -> str:
    """Marks this test's jobs; not `emg:`-prefixed, so no stack counts them as its own."""
    return f"shim-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def submitted(comment):
    """Whatever a test submits is cancelled after it."""
    yield
    for job_id in jobs_commented(comment):
        subprocess.run(["scancel", job_id], check=False, timeout=30)


def run(faults: SlurmFaults, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env={**os.environ, **faults.env()}, capture_output=True, text=True, timeout=timeout)


def sbatch_argv(comment: str, *options: str) -> list[str]:
    return [
        "sbatch",
        "--parsable",
        f"--comment={comment}",
        "--job-name=shim-test",
        "--output=/dev/null",
        "--time=1",
        *options,
        "--wrap",
        "true",
    ]


def jobs_commented(comment: str) -> list[str]:
    """Ids of the jobs with this comment that the real squeue or sacct know of (not through the shim)."""
    queued = subprocess.run(
        ["/usr/bin/squeue", "--noheader", "--all", "-t", "all", "-o", "%A|%k"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    accounted = subprocess.run(
        [
            "/usr/bin/sacct",
            "-X",
            "--parsable2",
            "--noheader",
            "-o",
            "JobIDRaw,Comment",
            "-S",
            "now-1hours",
            "-E",
            "now",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    lines = [line.split("|", 1) for line in (queued + accounted).splitlines() if "|" in line]
    return sorted({job_id for job_id, line_comment in lines if line_comment == comment}, key=int)


def test_env_puts_the_shim_first_and_names_the_control_file(faults):
    env = faults.env({"PATH": "/usr/local/bin:/usr/bin"})

    assert env["PATH"] == f"{BIN_DIR}:/usr/local/bin:/usr/bin"
    assert env["EMG_SLURM_FAULTS"] == str(faults.control_path)
    assert subprocess.run(
        ["which", "sbatch"], env={**os.environ, **faults.env()}, capture_output=True, text=True
    ).stdout.strip() == str(BIN_DIR / "sbatch")


def test_without_faults_sbatch_submits_a_real_job_and_the_call_is_logged(faults, comment, submitted):
    argv = sbatch_argv(comment)
    answer = run(faults, *argv)

    assert answer.returncode == 0, answer.stderr
    job_id = answer.stdout.strip().split(";")[0]
    assert job_id.isdigit()
    assert wait_until(lambda: jobs_commented(comment), timeout=30, message="Slurm knows the job") == [job_id]
    [call] = faults.calls("sbatch")
    assert call["argv"] == argv
    assert (call["outcome"], call["exit_code"], call["faults"]) == ("ran", 0, [])
    assert call["stdout"].strip() == answer.stdout.strip()
    assert call["pid"] > 0 and call["ppid"] == os.getpid()
    assert call["time"] <= call["ended"]


def test_every_command_passes_through_with_its_exit_code_and_without_a_control_file(faults):
    faults.control_path.unlink()  # an absent control file: pass through, still logged

    assert run(faults, "squeue", "--noheader", "-j", "1").returncode != 0  # job 1 is long gone: real error
    assert run(faults, "sacct", "--noheader", "-X", "-j", "1", "-o", "JobID").returncode == 0
    assert run(faults, "scancel", "--help").returncode == 0
    assert [(call["command"], call["outcome"]) for call in faults.calls()] == [
        ("squeue", "ran"),
        ("sacct", "ran"),
        ("scancel", "ran"),
    ]
    assert faults.calls()[0]["exit_code"] != 0 and "Invalid job id" in faults.calls()[0]["stderr"]


def test_a_stall_after_answers_late_with_the_real_answer(faults):
    faults.stall("sbatch", 2, when="after")
    started = time.monotonic()
    answer = run(faults, "sbatch", "--test-only", "--wrap", "true")

    assert time.monotonic() - started >= 2
    assert answer.returncode == 0 and "to start at" in answer.stderr
    [call] = faults.calls("sbatch")
    assert call["stalled_after"] == 2 and call["stalled_before"] == 0


def test_a_caller_that_gives_up_during_a_stall_after_has_a_job_it_never_learnt_of(faults, comment, submitted):
    faults.stall("sbatch", 30, when="after")

    with pytest.raises(subprocess.TimeoutExpired):
        run(faults, *sbatch_argv(comment), timeout=3)

    assert wait_until(lambda: jobs_commented(comment), timeout=30, message="Slurm has the job")
    [call] = faults.calls("sbatch")
    assert call["outcome"] is None  # killed before it answered


def test_a_caller_that_gives_up_during_a_stall_before_leaves_no_job(faults, comment, submitted):
    faults.stall("sbatch", 30, when="before")

    with pytest.raises(subprocess.TimeoutExpired):
        run(faults, *sbatch_argv(comment), timeout=3)

    # The shim is dead (subprocess.run waited for it after killing it), and it had not started
    # the real sbatch: nothing can submit this job any more.
    [call] = faults.calls("sbatch")
    assert call["outcome"] is None
    assert jobs_commented(comment) == []


def test_a_stall_before_delays_the_real_command(faults):
    faults.stall("squeue", 2, when="before")
    started = time.monotonic()
    answer = run(faults, "squeue", "--noheader", "--me", "-o", "%A")

    assert answer.returncode == 0
    assert time.monotonic() - started >= 2
    assert faults.calls("squeue")[0]["stalled_before"] == 2


def test_a_failure_for_the_first_calls_only_then_the_real_command(faults):
    stderr = "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation"
    fault = faults.fail("sbatch", stderr=stderr, exit_code=1, times=2)

    answers = [run(faults, "sbatch", "--test-only", "--wrap", "true") for _ in range(3)]

    assert [(a.returncode, a.stderr.strip()) for a in answers[:2]] == [(1, stderr)] * 2
    assert answers[2].returncode == 0 and "to start at" in answers[2].stderr
    calls = faults.calls("sbatch")
    assert [(c["outcome"], c["exit_code"], c["faults"]) for c in calls] == [
        ("failed", 1, [fault]),
        ("failed", 1, [fault]),
        ("ran", 0, []),
    ]


def test_a_failure_matched_on_an_argument_spares_the_other_calls(faults):
    faults.fail("sbatch", stderr="sbatch: error: refused", exit_code=4, match="--job-name=refuse-me")

    refused = run(faults, "sbatch", "--test-only", "--job-name=refuse-me", "--wrap", "true")
    accepted = run(faults, "sbatch", "--test-only", "--job-name=accept-me", "--wrap", "true")

    assert (refused.returncode, refused.stderr.strip()) == (4, "sbatch: error: refused")
    assert accepted.returncode == 0
    assert [c["outcome"] for c in faults.calls("sbatch")] == ["failed", "ran"]


def test_added_arguments_reach_the_real_sbatch_which_rejects_a_real_invalid_partition(faults, comment, submitted):
    faults.add_args("sbatch", ["--partition=nope"], match="--job-name=shim-bad")

    rejected = run(faults, *sbatch_argv(comment, "--job-name=shim-bad"))
    accepted = run(faults, *sbatch_argv(comment))

    assert rejected.returncode != 0 and "invalid partition" in rejected.stderr.lower()
    assert accepted.returncode == 0, accepted.stderr
    assert wait_until(lambda: jobs_commented(comment), timeout=30, message="Slurm has the good job") == [
        accepted.stdout.strip().split(";")[0]
    ]
    assert [c["added_args"] for c in faults.calls("sbatch")] == [["--partition=nope"], []]


def test_clear_ends_the_faults_and_keeps_the_calls(faults):
    faults.fail("squeue", stderr="squeue: error: slurm_load_jobs error: Socket timed out", exit_code=1)
    assert run(faults, "squeue", "--noheader", "--me").returncode == 1

    faults.clear()

    assert run(faults, "squeue", "--noheader", "--me").returncode == 0
    assert [c["outcome"] for c in faults.calls("squeue")] == ["failed", "ran"]


def test_concurrent_calls_share_a_limited_fault_exactly(faults):
    faults.fail("sbatch", stderr="sbatch: error: busy", exit_code=1, times=3)
    environment = {**os.environ, **faults.env()}
    processes = [
        subprocess.Popen(
            ["sbatch", "--test-only", "--wrap", "true"],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(8)
    ]

    codes = sorted(process.wait(timeout=60) for process in processes)

    assert codes == [0] * 5 + [1] * 3
    assert sorted(c["outcome"] for c in faults.calls("sbatch")) == ["failed"] * 3 + ["ran"] * 5
