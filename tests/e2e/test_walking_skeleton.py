"""A saved AnalysisRequest runs a real Slurm job through Redis, Celery, Prefect and the reconciler."""

import subprocess

import pytest
from prefect.client.orchestration import get_client

from emg.models import AnalysisRequest, ClusterJob, JobWait, OutboxEvent, Study
from emg.processes import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.django_db(transaction=True)]


def slurm_jobs_tagged(tag: str) -> list[str]:
    """Job ids Slurm's own accounting holds for this tag: the count that cannot be fooled by our database."""
    output = subprocess.run(
        ["sacct", "-X", "--parsable2", "--noheader", "-o", "JobIDRaw,Comment", "-S", "now-1days", "-E", "now"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    return [line.split("|", 1)[0] for line in output.splitlines() if line.split("|", 1)[-1] == f"emg:{tag}"]


def state_names(flow_run_id) -> list[str]:
    with get_client(sync_client=True) as client:
        return [state.name for state in client.read_flow_run_states(flow_run_id)]


def final_request(request: AnalysisRequest, stack, timeout: float = 120) -> AnalysisRequest:
    def finished():
        request.refresh_from_db()
        return request.status in AnalysisRequest.FINAL_STATUSES

    try:
        wait_until(finished, timeout=timeout, interval=0.5, message=f"request #{request.id} finished")
    except AssertionError:
        print(stack.logs())
        raise
    return request


def request_job(request: AnalysisRequest) -> ClusterJob:
    [wait] = JobWait.objects.filter(request=request).select_related("job")
    return wait.job


def test_saved_request_completes_through_one_slurm_job_and_a_suspended_flow(stack):
    study = Study.objects.create(accession="PRJEB10001")
    request = AnalysisRequest.objects.create(study=study)

    request = final_request(request, stack)

    assert request.status == AnalysisRequest.Status.COMPLETED, request.status_reason
    assert request.flow_run_id is not None
    job = request_job(request)
    assert job.state == "COMPLETED" and job.exit_code == 0
    assert slurm_jobs_tagged(job.tag) == [job.slurm_job_id]
    names = state_names(request.flow_run_id)
    assert names[-1] == "Completed"
    assert names.index("Running") < names.index("Suspended") < len(names) - 1
    assert OutboxEvent.objects.get(request=request).dispatched_at is not None


def test_early_resume_reruns_the_flow_from_the_top_without_a_second_submission(stack):
    study = Study.objects.create(accession="PRJEB10002")
    request = AnalysisRequest.objects.create(study=study, pipeline_options={"duration": 15})

    def suspended_while_job_runs():
        request.refresh_from_db()
        wait = JobWait.objects.filter(request=request).select_related("job").first()
        return (
            request.flow_run_id and wait and wait.job.slurm_job_id and not wait.job.is_final
            and state_names(request.flow_run_id)[-1] == "Suspended"
        )

    wait_until(suspended_while_job_runs, timeout=90, interval=0.5, message="flow suspended while its job runs")
    with get_client(sync_client=True) as client:
        client.resume_flow_run(request.flow_run_id)
    # The re-run finds its job unfinished and suspends again, under a new key.
    wait_until(lambda: JobWait.objects.get(request=request).suspensions == 2, timeout=60,
               message="the resumed flow suspended a second time")

    request = final_request(request, stack)

    assert request.status == AnalysisRequest.Status.COMPLETED, request.status_reason
    job = request_job(request)
    assert slurm_jobs_tagged(job.tag) == [job.slurm_job_id]
    assert ClusterJob.objects.count() == 1
    assert state_names(request.flow_run_id).count("Suspended") == 2


def test_failing_job_fails_the_request_with_slurm_state_and_exit_code(stack):
    study = Study.objects.create(accession="PRJEB10003")
    request = AnalysisRequest.objects.create(study=study, pipeline_options={"exit_code": 3})

    request = final_request(request, stack)

    assert request.status == AnalysisRequest.Status.FAILED
    assert "FAILED" in request.status_reason and "exit code 3" in request.status_reason
    job = request_job(request)
    assert (job.state, job.exit_code) == ("FAILED", 3)
    assert slurm_jobs_tagged(job.tag) == [job.slurm_job_id]
