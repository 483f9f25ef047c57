"""A request runs through the reconciler on the slurmrestd backend, with no Slurm command on the stack's
PATH, and survives its slurmrestd killed and restarted while its job runs.

Runs on a runner, Celery worker and beat of this module's own, talking to a slurmrestd of its own
(so that killing it disturbs nobody), on the session's Redis, Prefect server, PostgreSQL and Slurm.
"""

import os

import pytest

from devstack.processes import wait_until
from devstack.stack import Stack
from emg.models import AnalysisRequest, ReconcileTick
from tests.e2e.requests import assert_each_job_ran_once_in_slurm, final_request, jobs_of, new_request
from tests.slurm import (
    cluster_blocked,
    own_slurmrestd,
    slurm_command_stand_ins,
    squeue_state,
    write_token_file,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def rest_stack(stack, service_logs, tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("starting slurmrestd as its own user needs root")
    directory = tmp_path_factory.mktemp("rest-stack")
    server, url = own_slurmrestd(service_logs)
    server.start()
    stand_ins, called = slurm_command_stand_ins(directory)
    env = {
        **stack.env,
        "EMG_CLUSTER_BACKEND": "slurmrestd",
        "EMG_SLURMRESTD_URL": url,
        "EMG_SLURMRESTD_TOKEN_FILE": str(write_token_file(directory)),
        "PATH": f"{stand_ins}:{os.environ['PATH']}",
        # The cap counts every emg-tagged job of this Slurm user, other sessions' included.
        "EMG_MAX_ACTIVE_JOBS": "1000000",
    }
    own = Stack(env, service_logs, label="rest")
    own.slurmrestd = server
    with stack.paused():
        own.start()
        try:
            yield own
        finally:
            own.stop()
            server.stop()
    assert not called.exists(), f"the stack ran Slurm commands:\n{called.read_text()}"


def tick_errors_since(started) -> list[str]:
    return [
        error
        for tick in ReconcileTick.objects.filter(started_at__gte=started)
        for error in tick.report.get("errors", [])
    ]


def test_a_request_completes_through_slurmrestd_killed_and_restarted_while_its_job_runs(rest_stack):
    with cluster_blocked():
        request = new_request("PRJEB40001")

        def assembly_pending():
            job = jobs_of(request).get("assembly")
            return job if job is not None and job.slurm_job_id and squeue_state(job.slurm_job_id) == "PENDING" else None

        job = wait_until(assembly_pending, timeout=120, interval=0.5, message="the assembly job pends, via slurmrestd")
        rest_stack.slurmrestd.kill()
        killed_at = ReconcileTick.objects.latest("started_at").started_at
    # The job runs and ends while slurmrestd is down: the ticks meanwhile fail, and say why.
    wait_until(
        lambda: squeue_state(job.slurm_job_id) in ("", "COMPLETED"),
        timeout=120,
        message="the assembly job ends in Slurm",
    )
    errors = wait_until(
        lambda: [e for e in tick_errors_since(killed_at) if "slurmrestd" in e],
        timeout=60,
        message="a tick reports slurmrestd down",
    )
    assert any("cannot connect to slurmrestd" in e for e in errors), errors
    request.refresh_from_db()
    assert not request.is_final

    rest_stack.slurmrestd.start()
    request = final_request(request, rest_stack, timeout=300)
    assert request.status == AnalysisRequest.Status.COMPLETED, request.status_reason
    jobs = jobs_of(request)
    assert set(jobs) == {"assembly", "analysis", "data move"}
    assert_each_job_ran_once_in_slurm(jobs.values())
