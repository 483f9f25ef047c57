"""Asking Slurm itself what ran: the counts a bug in our database cannot fake."""

import getpass
import os
import subprocess
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from devstack.processes import wait_until
from slurm_adapter.cluster import job_comment

ACTIVE_SQUEUE_STATES = "PENDING,RUNNING"
# Where scripts/slurm-up.sh has slurmrestd listen.
SLURMRESTD_URL = "http://127.0.0.1:6820"


def test_cluster_backend() -> str:
    """Which backend of the real cluster the stacks and the reconciler tests use:
    EMG_TEST_CLUSTER_BACKEND=slurm (Slurm's commands, the default) or slurmrestd."""
    backend = os.environ.get("EMG_TEST_CLUSTER_BACKEND", "slurm")
    if backend not in ("slurm", "slurmrestd"):
        raise ValueError(f"EMG_TEST_CLUSTER_BACKEND must be slurm or slurmrestd, not {backend!r}")
    return backend


def write_token_file(directory: Path, lifespan_s: int = 6 * 3600) -> Path:
    """A JWT in a file only we can read, as a site's token renewer would keep it."""
    path = directory / "jwt"
    path.write_text(mint_token(lifespan_s))
    path.chmod(0o600)
    return path


# Slurm's commands, which a process on the slurmrestd backend must never run.
SLURM_COMMANDS = ("sbatch", "sacct", "squeue", "scancel", "sinfo", "scontrol", "srun", "salloc", "sacctmgr")


def slurm_command_stand_ins(directory: Path) -> tuple[Path, Path]:
    """A directory to put first on PATH in which every Slurm command fails and says so, and the
    file each call is logged to (absent while none was made)."""
    stand_ins = directory / "no-slurm-commands"
    stand_ins.mkdir()
    called = directory / "slurm-commands-called"
    for command in SLURM_COMMANDS:
        path = stand_ins / command
        path.write_text(
            f'#!/bin/sh\necho "$0 $*" >> {called}\n'
            'echo "$0: the slurmrestd backend must not run Slurm commands" >&2\nexit 127\n'
        )
        path.chmod(0o755)
    return stand_ins, called


def own_slurmrestd(log_dir: Path):
    """A slurmrestd of a test's own on a free port, run as scripts/slurm-up.sh runs it (its own
    user, JWT), so that killing it disturbs nobody else's: (the process, not started yet; its URL)."""
    from devstack.processes import ManagedProcess
    from devstack.services import free_port

    address = f"127.0.0.1:{free_port()}"
    argv = [
        "setpriv",
        "--reuid=emg-slurmrestd",
        "--regid=emg-slurmrestd",
        "--clear-groups",
        "slurmrestd",
        "-a",
        "rest_auth/jwt",
        address,
    ]
    env = {"PATH": os.environ["PATH"], "SLURM_JWT": "daemon", "SLURM_CONF": "/etc/slurm/slurm.conf"}
    return ManagedProcess(
        f"slurmrestd-{address.rsplit(':', 1)[1]}", argv, env=env, log_dir=log_dir
    ), f"http://{address}"


def mint_token(lifespan_s: int = 3600) -> str:
    """A JWT for the current user, as a site's token service would hand one out (`scontrol token`)."""
    output = subprocess.run(
        ["scontrol", "token", f"username={getpass.getuser()}", f"lifespan={lifespan_s}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return output.strip().removeprefix("SLURM_JWT=")


def accounted_comments(*, including: Iterable[str] = (), timeout: float = 30) -> dict[str, str]:
    """Job id -> comment of every job Slurm's accounting holds from the last day.

    Accounting's time-window listing trails a job's end by a second or two: pass the ids we know
    of as `including` to wait until it shows them, so that any twin is listed as well.
    """
    including = set(including)

    def listed() -> dict[str, str]:
        output = subprocess.run(
            ["sacct", "-X", "--parsable2", "--noheader", "-o", "JobIDRaw,Comment", "-S", "now-1days", "-E", "now"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        comments = dict(line.split("|", 1) for line in output.splitlines() if "|" in line)
        return comments if including <= comments.keys() else {}

    return wait_until(listed, timeout=timeout, interval=0.5, message=f"Slurm accounting lists jobs {sorted(including)}")


def slurm_jobs_tagged(tag: str, *, including: Iterable[str] = ()) -> list[str]:
    """Job ids Slurm's accounting holds for this tag, oldest first (ids grow with submission)."""
    comments = accounted_comments(including=including)
    return sorted((job_id for job_id, comment in comments.items() if comment == job_comment(tag)), key=int)


def cancel_jobs_under(work_dir: str) -> list[str]:
    """scancel every job of ours still queued or running whose working directory is under `work_dir`
    (what a test submitted through a stack of its own), so a failed test leaves nothing behind."""
    output = subprocess.run(
        ["squeue", "--noheader", "--all", "--me", "-t", ACTIVE_SQUEUE_STATES, "-o", "%A|%Z"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    prefix = work_dir.rstrip("/") + "/"
    ids = [
        job_id
        for job_id, _, directory in (line.partition("|") for line in output.splitlines())
        if (directory.rstrip("/") + "/").startswith(prefix)
    ]
    if ids:
        subprocess.run(["scancel", *ids], check=False, timeout=30)
    return ids


def active_jobs_of(fingerprints: set[str]) -> list[str]:
    """Ids of the jobs, any attempt, of these fingerprints that Slurm has PENDING or RUNNING right now."""
    output = subprocess.run(
        ["squeue", "--noheader", "--all", "--me", "-t", ACTIVE_SQUEUE_STATES, "-o", "%A|%k"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    # A tag starts with the fingerprint's first 16 characters (emg.models.ClusterJob.tag).
    prefixes = tuple(job_comment(fingerprint[:16]) + "-" for fingerprint in fingerprints)
    return [line.split("|", 1)[0] for line in output.splitlines() if line.split("|", 1)[-1].startswith(prefixes)]


@contextmanager
def cluster_blocked():
    """Hold the whole node with one exclusive job, so every job submitted meanwhile stays PENDING.

    A real way to keep a job from ending for exactly as long as a test needs: holding or
    suspending the job itself races with it starting and finishing in a second or two.
    """
    blocker = (
        subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--exclusive",
                "--job-name=emg-test-blocker",
                "--output=/dev/null",
                "--wrap",
                "sleep 900",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        .stdout.strip()
        .split(";")[0]
    )
    try:
        # Exclusive: it starts once the jobs already running (other tests') have ended.
        wait_until(lambda: squeue_state(blocker) == "RUNNING", timeout=300, message="the blocking job runs")
        yield blocker
    finally:
        subprocess.run(["scancel", blocker], check=False, timeout=30)


def squeue_state(job_id: str) -> str:
    return subprocess.run(
        ["squeue", "--noheader", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
