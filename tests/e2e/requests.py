"""Creating requests against the live stack and watching them: shared by the e2e tests."""

from prefect.client.orchestration import get_client

from emg.models import AnalysisRequest, ClusterJob, JobWait, Study
from emg.processes import wait_until
from tests.slurm import slurm_jobs_tagged, squeue_state


def state_names(flow_run_id) -> list[str]:
    with get_client(sync_client=True) as client:
        return [state.name for state in client.read_flow_run_states(flow_run_id)]


def final_request(request: AnalysisRequest, stack, timeout: float = 180) -> AnalysisRequest:
    def finished():
        request.refresh_from_db()
        return request.is_final

    try:
        wait_until(finished, timeout=timeout, interval=0.5, message=f"request #{request.id} finished")
    except AssertionError:
        print(stack.logs())
        raise
    return request


def jobs_of(request: AnalysisRequest) -> dict[str, ClusterJob]:
    return {wait.step: wait.job for wait in JobWait.objects.filter(request=request).select_related("job")}


def assert_each_job_ran_once_in_slurm(jobs) -> None:
    for job in jobs:
        assert slurm_jobs_tagged(job.tag, including=[job.slurm_job_id]) == [job.slurm_job_id], job


def new_request(accession: str, **fields) -> AnalysisRequest:
    study, _ = Study.objects.get_or_create(accession=accession)
    return AnalysisRequest.objects.create(study=study, **fields)


def suspended_on_pending_assembly(request: AnalysisRequest) -> ClusterJob:
    """Wait (inside `cluster_blocked()`) until the flow is suspended on its submitted, pending assembly job."""

    def pending_job():
        job = jobs_of(request).get("assembly")
        return job if job is not None and job.slurm_job_id and squeue_state(job.slurm_job_id) == "PENDING" else None

    job = wait_until(pending_job, timeout=90, interval=0.2, message="the assembly job is submitted and pending")
    wait_until(lambda: state_names(request.flow_run_id)[-1] == "Suspended", timeout=60,
               message="the flow is suspended on its job")
    return job
