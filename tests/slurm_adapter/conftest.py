"""Fixtures for slurm_adapter tests: a real Slurm cluster (scripts/slurm-up.sh) and a local one.

Needs no Django: run with `python -m pytest -p no:django tests/slurm_adapter`.
"""

from __future__ import annotations

import getpass
import os
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from devstack.processes import wait_until
from slurm_adapter import JobSpec, JobState, JobStatus, LocalCluster, RestCluster, SlurmCluster, SubmittedJob
from tests.slurm import SLURMRESTD_URL, mint_token

REPO = Path(__file__).resolve().parents[2]
RUN_ID = uuid.uuid4().hex[:6]


def _wait_for_state(cluster, job: SubmittedJob, states: set[JobState], timeout: float = 30.0) -> JobStatus:
    def reached() -> JobStatus | None:
        status = cluster.query([job])[job.job_id]
        return status if status.state in states else None

    return wait_until(reached, timeout=timeout, message=f"job {job.job_id} to be one of {sorted(states)}")


def _wait_final(cluster, job: SubmittedJob, timeout: float = 30.0) -> JobStatus:
    return _wait_for_state(cluster, job, {s for s in JobState if s.is_final}, timeout)


def _slurm_cmd(*args: str, timeout: float = 30) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=timeout).stdout


def _slurm_answers() -> bool:
    """Slurm's commands and slurmrestd (with the JWT the daemons accept) both answer."""
    # Before slurm.conf exists a client hangs on a DNS SRV lookup: do not even try.
    if not Path("/etc/slurm/slurm.conf").exists():
        return False
    try:
        if subprocess.run(["sinfo", "-h"], check=False, capture_output=True, timeout=10).returncode != 0:
            return False
        headers = {"X-SLURM-USER-NAME": getpass.getuser(), "X-SLURM-USER-TOKEN": mint_token(60)}
        return httpx.get(f"{SLURMRESTD_URL}/slurm/v0.0.38/ping", headers=headers, timeout=10).status_code == 200
    except (OSError, subprocess.SubprocessError, httpx.HTTPError):
        return False


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., object]:
    return wait_until


@pytest.fixture
def wait_for_state() -> Callable[..., JobStatus]:
    return _wait_for_state


@pytest.fixture
def wait_final() -> Callable[..., JobStatus]:
    return _wait_final


@pytest.fixture
def slurm_cmd(slurm_up: None) -> Callable[..., str]:
    """Runs a Slurm command (argument list) and returns its stdout."""
    return _slurm_cmd


@pytest.fixture(scope="session")
def slurm_up() -> Iterator[None]:
    if not _slurm_answers():
        if os.geteuid() != 0:
            pytest.skip("the Slurm cluster is down and starting it (scripts/slurm-up.sh) needs root")
        subprocess.run(["bash", str(REPO / "scripts/slurm-up.sh")], check=True, stdin=subprocess.DEVNULL, timeout=600)
    yield
    _cancel_jobs_of_this_run()


def _cancel_jobs_of_this_run() -> None:
    """Cancels every job this run left queued or running (held jobs, sleepers)."""
    listing = _slurm_cmd("squeue", "--noheader", "--all", "--me", "-o", "%A|%k")
    ids = [i for i, _, c in (line.partition("|") for line in listing.splitlines()) if c.startswith(f"emg:t{RUN_ID}-")]
    if ids:
        _slurm_cmd("scancel", *ids)


@pytest.fixture
def tag(request: pytest.FixtureRequest) -> str:
    """Unique per test and per run, so tests never see each other's jobs."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return f"t{RUN_ID}-{name}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def slurm_cluster(slurm_up: None) -> SlurmCluster:
    return SlurmCluster(accounting_grace_s=60)


@pytest.fixture(scope="session")
def rest_token_file(slurm_up: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A token file as a renewer keeps it: `scontrol token`'s own output."""
    path = tmp_path_factory.mktemp("slurmrestd") / "token"
    path.write_text(f"SLURM_JWT={mint_token()}\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def slurmrestd_cluster(rest_token_file: Path) -> Iterator[RestCluster]:
    cluster = RestCluster(
        url=SLURMRESTD_URL, user=getpass.getuser(), token_file=str(rest_token_file), accounting_grace_s=60
    )
    assert cluster.version  # discovered from /openapi/v3 before the test counts requests
    cluster.calls.clear()
    yield cluster
    cluster.close()


@pytest.fixture
def local_cluster(tmp_path: Path) -> LocalCluster:
    return LocalCluster(str(tmp_path / "local-jobs"))


@pytest.fixture(
    params=[
        pytest.param("slurm", marks=pytest.mark.slurm),
        pytest.param("slurmrestd", marks=pytest.mark.slurm),
        "local",
    ]
)
def cluster(request: pytest.FixtureRequest):
    return request.getfixturevalue(f"{request.param}_cluster")


@pytest.fixture(
    params=[pytest.param("slurm", marks=pytest.mark.slurm), pytest.param("slurmrestd", marks=pytest.mark.slurm)]
)
def real_cluster(request: pytest.FixtureRequest):
    """Either backend of the real Slurm cluster: its commands, or slurmrestd."""
    return request.getfixturevalue(f"{request.param}_cluster")


@pytest.fixture
def spec(tmp_path: Path) -> Callable[..., JobSpec]:
    """A JobSpec factory with small defaults, working in this test's tmp dir."""

    def make(*command: str, **overrides) -> JobSpec:
        fields = {"name": "test job", "command": command, "work_dir": str(tmp_path / "work"), "memory_mb": 100}
        fields.update(overrides)
        return JobSpec(**fields)

    return make
