"""The slurmrestd backend: tokens, retries, API versions, and the answers of each version it reads.

The contract tests (test_backends.py, test_slurm.py) run on it too; these cover what only it has.
"""

from __future__ import annotations

import getpass
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from slurm_adapter import (
    ClusterError,
    JobSpec,
    JobState,
    RestCluster,
    SubmissionRejected,
    SubmittedJob,
    UnknownSlurmState,
    make_cluster,
)
from slurm_adapter.rest import TokenSource
from slurm_adapter.rest_api import Dialect, state_word, wait_status
from slurm_adapter.spec import DEFAULT_PATH
from tests.slurm import SLURMRESTD_URL, mint_token
from tests.slurm_adapter.rest_proxy import FaultProxy

DATA = Path(__file__).parent / "data"
REAL_22_05 = json.loads((DATA / "rest_v0.0.38_failed_job.json").read_text())
SHAPES_41 = json.loads((DATA / "rest_v0.0.41_shapes.json").read_text())


def _rest(url: str = SLURMRESTD_URL, **options) -> RestCluster:
    options.setdefault("token", mint_token())
    return RestCluster(url=url, user=getpass.getuser(), retry_backoff_s=0.05, **options)


# --- answers of each version, read as the CLI backend reads sacct and squeue ------------------------


def test_22_05_accounting_reports_exit_code_0_for_a_failed_job_so_it_is_left_unknown() -> None:
    """Recorded from the test cluster's slurmrestd: the job exited 3, accounting says 0."""
    [job] = REAL_22_05["slurmdb_jobs"]["jobs"]
    assert job["exit_code"]["return_code"] == 0 and job["state"]["current"] == "FAILED"
    record = Dialect("v0.0.38").accounting_record(job)
    assert (record.state, record.exit_code, record.signal, record.tag) == (JobState.FAILED, None, None, "recorded")
    assert record.submit_time is not None and record.submit_time.tzinfo is UTC


def test_22_05_controller_reports_the_wait_status() -> None:
    [job] = REAL_22_05["slurm_jobs"]["jobs"]
    record = Dialect("v0.0.38").controller_record(job)
    assert (record.state, record.exit_code, record.signal, record.tag) == (JobState.FAILED, 3, None, "recorded")
    assert wait_status(9) == (0, 9) and wait_status(0) == (0, None) and wait_status(None) == (None, None)


def test_v0_0_41_accounting_records() -> None:
    failed, killed, held = (Dialect("v0.0.41").accounting_record(j) for j in SHAPES_41["slurmdb_jobs"]["jobs"])
    assert (failed.job_id, failed.state, failed.exit_code, failed.signal) == ("4211", JobState.FAILED, 3, None)
    assert failed.end_time == datetime.fromtimestamp(1796238455, UTC) and failed.tag == "recorded"
    assert (killed.state, killed.exit_code, killed.signal) == (JobState.FAILED, 0, 9)
    assert (held.state, held.exit_code, held.start_time, held.end_time) == (JobState.PENDING, None, None, None)


def test_v0_0_41_controller_records_read_flags_as_squeue_prints_them() -> None:
    failed, completing, requeued = (Dialect("v0.0.41").controller_record(j) for j in SHAPES_41["slurm_jobs"]["jobs"])
    assert (failed.state, failed.exit_code, failed.submit_time) == (
        JobState.FAILED,
        3,
        datetime.fromtimestamp(1796238453, UTC),
    )
    assert (completing.raw_state, completing.state, completing.exit_code) == ("COMPLETING", JobState.RUNNING, None)
    assert (requeued.raw_state, requeued.state, requeued.tag) == ("REQUEUED", JobState.PENDING, None)


@pytest.mark.parametrize("version", ["v0.0.38", "v0.0.41"])
def test_an_unknown_state_is_reported_with_its_text(version: str) -> None:
    """The reconciler halves the batch around it (job_states.query_readable): reported, never fatal."""
    state = "TELEPORTED" if version == "v0.0.38" else ["TELEPORTED"]
    with pytest.raises(UnknownSlurmState) as error:
        Dialect(version).accounting_record({"job_id": 1, "state": {"current": state}, "time": {}})
    assert error.value.raw == "TELEPORTED"
    with pytest.raises(ValueError):
        state_word({"current": "RUNNING"})


@pytest.mark.parametrize("version", ["v0.0.38", "v0.0.40", "v0.0.41"])
def test_submission_body_carries_the_same_job_as_sbatch(version: str) -> None:
    spec = JobSpec(
        name="n",
        command=("true",),
        work_dir="/w",
        time_limit_minutes=7,
        memory_mb=300,
        cpus=2,
        partition="debug",
        environment={"FOO": "bar"},
        extra_options=(
            "--qos=high",
            "--account=a",
            "--constraint=c",
            "--gres=gpu:1",
            "--nice=5",
            "--reservation=r",
            "--hold",
        ),
    )
    body = Dialect(version).submission(spec, "#!/bin/bash\n", name="t n", comment="emg:t", output="/w/.emg/t.%j.log")
    job = body["job"]
    assert (job["name"], job["comment"], job["requeue"], job["current_working_directory"]) == (
        "t n",
        "emg:t",
        False,
        "/w",
    )
    assert (job["qos"], job["account"], job["constraints"], job["nice"], job["reservation"], job["hold"]) == (
        "high",
        "a",
        "c",
        5,
        "r",
        True,
    )
    assert job["standard_output"] == job["standard_error"] == "/w/.emg/t.%j.log"
    # Only PATH, as with sbatch --export=NONE: the spec's variables are exported by the script.
    if version == "v0.0.38":
        assert (job["environment"], job["time_limit"], job["memory_per_node"], job["gres"]) == (
            {"PATH": DEFAULT_PATH},
            7,
            300,
            "gpu:1",
        )
    else:
        assert job["environment"] == [f"PATH={DEFAULT_PATH}"] and job["tres_per_node"] == "gres/gpu:1"
        assert job["time_limit"] == {"set": True, "infinite": False, "number": 7}
        assert job["memory_per_node"]["number"] == 300
    assert ("script" in body) == (version in ("v0.0.38", "v0.0.40")) and ("script" in job) == (version == "v0.0.41")


def test_partition_limits_of_v0_0_41() -> None:
    partitions = [
        {"name": "debug", "flags": ["DEFAULT"], "maximums": {"time": {"set": True, "infinite": True, "number": 0}}},
        {"name": "short", "maximums": {"time": {"set": True, "infinite": False, "number": 60}}},
    ]
    nodes = [
        {"name": "a", "real_memory": 4000, "partitions": ["debug", "short"]},
        {"name": "b", "real_memory": 2000, "partitions": ["short"]},
    ]
    limits = Dialect("v0.0.41").partition_limits(partitions, nodes)
    assert (limits[None], limits["debug"].max_time_minutes) == (limits["debug"], None)
    assert (limits["short"].max_time_minutes, limits["short"].max_memory_mb) == (60, 2000)


def test_bad_settings_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        RestCluster(url=SLURMRESTD_URL, user="u")
    with pytest.raises(ValueError, match="exactly one"):
        RestCluster(url=SLURMRESTD_URL, user="u", token="x", token_file=str(tmp_path / "t"))
    with pytest.raises(ValueError, match="unsupported"):
        RestCluster(url=SLURMRESTD_URL, user="u", token="x", api_version="v0.0.39")
    with pytest.raises(ValueError, match="http"):
        RestCluster(url="127.0.0.1:6820", user="u", token="x")
    assert (
        make_cluster(
            "slurmrestd",
            rest_url=SLURMRESTD_URL,
            rest_user="u",
            rest_token="x",
            root_dir="/ignored",
            min_query_interval_s=0,
        ).name
        == "slurmrestd"
    )
    assert "x" not in repr(TokenSource(token="x")) and "secret" not in repr(
        RestCluster(url=SLURMRESTD_URL, user="u", token="secret")
    )


# --- the real slurmrestd ------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.parametrize("version", ["v0.0.36", "v0.0.37", "v0.0.38"])
def test_every_22_05_version_runs_a_job_for_real(slurm_up, version, spec, tag, wait_final) -> None:
    cluster = _rest(api_version=version)
    job = cluster.submit(spec("bash", "-c", "echo on $SLURM_JOB_ID; exit 4"), tag)
    status = wait_final(cluster, job)
    assert (status.state, status.exit_code, status.tag) == (JobState.FAILED, 4, tag)
    assert cluster.tail_log(job.log_path) == f"on {job.job_id}"
    assert [s.job_id for s in cluster.find_by_tag(tag)] == [job.job_id]


@pytest.mark.slurm
def test_the_version_is_discovered_from_openapi(slurm_up) -> None:
    cluster = _rest()
    assert cluster.version == "v0.0.38"  # what Debian 12's 22.05 serves at most
    assert cluster.calls == {"GET /openapi/v3": 1}


@pytest.mark.slurm
def test_a_tick_costs_one_request_unless_a_job_failed_on_22_05(
    slurmrestd_cluster, spec, tag, wait_final, wait_for_state
) -> None:
    """Measured: accounting answers for every awaited job at once; 22.05's accounting reports exit
    code 0 for all, so a job that ended unsuccessfully costs the controller's list too."""
    cluster = slurmrestd_cluster
    done = cluster.submit(spec("true"), tag)
    failed = cluster.submit(spec("false"), tag)
    running = cluster.submit(spec("sleep", "300"), tag)
    wait_final(cluster, done)
    wait_for_state(cluster, running, {JobState.RUNNING})
    wait_for_state(cluster, failed, {JobState.FAILED})  # in accounting, not a placeholder
    cluster.calls.clear()
    assert {s.state for s in cluster.query([done, running]).values()} == {JobState.COMPLETED, JobState.RUNNING}
    assert cluster.calls == {"GET /slurmdb/jobs": 1}
    cluster.calls.clear()
    assert cluster.query([done, running, failed])[failed.job_id].exit_code == 1
    assert cluster.calls == {"GET /slurmdb/jobs": 1, "GET /slurm/jobs": 1}
    cluster.cancel(running.job_id)


@pytest.mark.slurm
def test_a_rewritten_token_file_is_picked_up_while_running(slurm_up, tmp_path: Path) -> None:
    token_file = tmp_path / "jwt"
    token_file.write_text("SLURM_JWT=not-a-token\n")
    cluster = _rest(token=None, token_file=str(token_file))
    job = SubmittedJob("99999995", datetime.now(UTC), "/x.log")
    with pytest.raises(ClusterError, match="token was refused") as refused:
        cluster.query([job])
    assert "not-a-token" not in str(refused.value)
    token_file.write_text(f"SLURM_JWT={mint_token()}\n")  # a renewer rotates it
    assert cluster.query([job])[job.job_id].state is JobState.SUBMITTED
    assert cluster.token.reads == 2
    cluster.query([job])
    assert cluster.token.reads == 2  # read again only when it changes
    token_file.unlink()
    with pytest.raises(ClusterError, match="cannot read the slurmrestd token file"):
        cluster.query([job])


@pytest.mark.slurm
def test_a_transient_error_is_retried(slurm_up) -> None:
    with FaultProxy(SLURMRESTD_URL) as proxy:
        cluster = _rest(proxy.url, api_version="v0.0.38")
        job = SubmittedJob("99999994", datetime.now(UTC) - timedelta(hours=1), "/x.log")
        proxy.fail_next(503, 502)
        assert cluster.query([job])[job.job_id].state is JobState.LOST
        assert proxy.requests == [("GET", "/slurmdb/v0.0.38/jobs")] * 3 + [("GET", "/slurm/v0.0.38/jobs")]
        proxy.fail_next(503, 503, 503)  # more than the 2 retries: the call fails, the next tick tries again
        with pytest.raises(ClusterError, match="answered 503"):
            cluster.count_active()

        # slurmrestd up, slurmctld behind it restarting: Slurm's own error, in slurmrestd's shape.
        proxy.requests.clear()
        unreachable = {
            "errors": [
                {
                    "error": "Unable to contact slurm controller (connect failure)",
                    "error_number": 1001,
                    "description": "slurm_load_jobs",
                }
            ]
        }
        proxy.fail_next((500, unreachable))
        assert cluster.count_active() >= 0
        assert proxy.requests == [("GET", "/slurm/v0.0.38/jobs")] * 2


@pytest.mark.slurm
def test_a_permanent_error_is_not_retried(slurm_up, spec, tag) -> None:
    with FaultProxy(SLURMRESTD_URL) as proxy:
        cluster = _rest(proxy.url, api_version="v0.0.38")
        with pytest.raises(SubmissionRejected, match="Invalid partition"):
            cluster.submit(spec("true", partition="nosuchpartition"), tag)
        assert proxy.requests == [("POST", "/slurm/v0.0.38/job/submit")]

        proxy.requests.clear()
        wrong = RestCluster(url=proxy.url, user=getpass.getuser(), token="wrong", api_version="v0.0.38")
        with pytest.raises(ClusterError, match="token was refused"):
            wrong.query([SubmittedJob("99999993", datetime.now(UTC), "/x.log")])
        assert proxy.requests == [("GET", "/slurmdb/v0.0.38/jobs")]

        # A submission whose answer was lost may have queued the job: it is never sent twice.
        proxy.requests.clear()
        proxy.fail_next(503)
        with pytest.raises(ClusterError, match="answered 503") as lost:
            cluster.submit(spec("true"), tag)
        assert not isinstance(lost.value, SubmissionRejected)
        assert proxy.requests == [("POST", "/slurm/v0.0.38/job/submit")]


@pytest.mark.slurm
def test_no_slurmrestd_is_a_cluster_error_after_retries(slurm_up) -> None:
    from devstack.services import free_port

    cluster = _rest(f"http://127.0.0.1:{free_port()}", api_version="v0.0.38")
    with pytest.raises(ClusterError, match="cannot connect"):
        cluster.count_active()
    assert cluster.calls == {"GET /slurm/jobs": 3}


@pytest.mark.slurm
def test_an_expired_token_is_a_clear_error_on_every_call(slurm_up, wait_until) -> None:
    cluster = _rest(token=mint_token(lifespan_s=2), api_version="v0.0.38")
    job = SubmittedJob("99999992", datetime.now(UTC), "/x.log")

    def refused() -> str | None:
        try:
            cluster.query([job])
        except ClusterError as error:
            return str(error)
        return None

    assert "token expired at" in wait_until(refused, timeout=30, message="the 2-second token to expire")
    with pytest.raises(ClusterError, match="token expired at"):
        cluster.count_active()


@pytest.fixture
def own_slurmrestd(slurm_up, tmp_path: Path):
    import os

    from tests.slurm import own_slurmrestd

    if os.geteuid() != 0:
        pytest.skip("starting slurmrestd as its own user needs root")
    server, url = own_slurmrestd(tmp_path)
    yield server, url
    server.stop()


@pytest.mark.slurm
def test_slurmrestd_killed_and_restarted_mid_run_costs_only_the_ticks_in_between(
    own_slurmrestd, spec, tag, wait_until, wait_final
) -> None:
    server, url = own_slurmrestd
    server.start()
    cluster = _rest(url, api_version="v0.0.38")
    wait_until(lambda: _answers(cluster), timeout=30, message="our slurmrestd answers")
    job = cluster.submit(spec("sleep", "3"), tag)

    server.kill()
    with pytest.raises(ClusterError, match="cannot connect"):
        cluster.query([job])  # a tick while it is down: an error, nothing recorded

    server.start()
    wait_until(lambda: _answers(cluster), timeout=30, message="our slurmrestd answers again")
    status = wait_final(cluster, job)
    assert (status.state, status.exit_code, status.tag) == (JobState.COMPLETED, 0, tag)


def _answers(cluster: RestCluster) -> bool:
    try:
        cluster.ping()
    except ClusterError:
        return False
    return True


@pytest.mark.slurm
def test_auto_picks_the_newest_version_both_sides_serve(slurm_up) -> None:
    """What /openapi/v3 lists decides; the answers are slurmrestd's shape, given through the proxy."""

    def spec(*paths: str) -> tuple[int, dict]:
        return 200, {"openapi": "3.0.2", "paths": {path: {} for path in paths}}

    with FaultProxy(SLURMRESTD_URL) as proxy:
        proxy.fail_next(
            spec(
                "/slurm/v0.0.40/job/submit",
                "/slurmdb/v0.0.40/jobs/",
                "/slurm/v0.0.41/job/submit",
                "/slurmdb/v0.0.41/jobs/",
                "/slurm/v0.0.42/job/submit",
            )
        )
        assert _rest(proxy.url).version == "v0.0.41"  # v0.0.42 without its slurmdbd side is not enough
        proxy.fail_next(spec("/slurm/v0.0.39/job/submit", "/slurmdb/v0.0.39/jobs"))
        with pytest.raises(ClusterError, match="serves none of the API versions supported"):
            _rest(proxy.url).discover_version()
        assert _rest(proxy.url).version == "v0.0.38"  # the real one, past the proxy
