"""Creating requests against the live stack and watching them: shared by the e2e tests."""

import re
from collections import Counter
from collections.abc import Iterable

from prefect.client.orchestration import get_client

from devstack.processes import wait_until
from emg.models import AnalysisRequest, ClusterJob, JobWait, Study
from slurm_adapter.cluster import job_comment
from tests.slurm import accounted_comments, slurm_jobs_tagged, squeue_state


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


def assert_exactly_once_in_slurm(jobs: Iterable[ClusterJob]) -> None:
    """What Slurm's accounting holds against these rows (read from any database): no tag was
    submitted twice, every Slurm job of a row, whatever its attempt, is one the row's history names
    (nothing ran that the database does not know of), no attempt beyond the row's last, and the
    row's job is the one its current attempt's tag names."""
    jobs = list(jobs)
    comments = accounted_comments(including=[job.slurm_job_id for job in jobs if job.slurm_job_id], timeout=60)
    per_tag = Counter(comments.values())
    problems = []
    for job in jobs:
        # A tag is "<fingerprint16>-<row>-<attempt>": the row's jobs, any attempt, share the rest.
        prefix = job_comment(job.tag.rsplit("-", 1)[0] + "-")
        of_row = {job_id: comment for job_id, comment in comments.items() if comment.startswith(prefix)}
        recorded = " ".join(str(entry.get("detail", "")) for entry in job.history)
        for comment, count in per_tag.items():
            if comment.startswith(prefix) and count > 1:
                problems.append(
                    f"{comment} submitted {count} times: {sorted(i for i, c in of_row.items() if c == comment)}"
                )
        for job_id, comment in of_row.items():
            if not re.search(rf"\b{job_id}\b", recorded):
                problems.append(f"Slurm job {job_id} ({comment}) is not in the history of row #{job.id}")
            if int(comment.rsplit("-", 1)[1]) > job.attempts:
                problems.append(f"Slurm job {job_id} ({comment}) is beyond row #{job.id}'s {job.attempts} attempts")
        if job.slurm_job_id and of_row.get(job.slurm_job_id) != job_comment(job.tag):
            problems.append(
                f"row #{job.id} names Slurm job {job.slurm_job_id}, which Slurm lists as "
                f"{of_row.get(job.slurm_job_id)!r}, not {job_comment(job.tag)!r}"
            )
    assert not problems, "\n".join(
        problems
        + [
            f"row #{job.id} {job.name} attempts={job.attempts} slurm={job.slurm_job_id} history={job.history}"
            for job in jobs
        ]
    )


def new_request(accession: str, **fields) -> AnalysisRequest:
    study, _ = Study.objects.get_or_create(accession=accession)
    return AnalysisRequest.objects.create(study=study, **fields)


def suspended_on_pending_assembly(request: AnalysisRequest) -> ClusterJob:
    """Wait (inside `cluster_blocked()`) until the flow is suspended on its submitted, pending assembly job."""

    def pending_job():
        job = jobs_of(request).get("assembly")
        return job if job is not None and job.slurm_job_id and squeue_state(job.slurm_job_id) == "PENDING" else None

    job = wait_until(pending_job, timeout=90, interval=0.2, message="the assembly job is submitted and pending")
    request.refresh_from_db()  # its flow run is recorded by now
    wait_until(
        lambda: state_names(request.flow_run_id)[-1] == "Suspended",
        timeout=60,
        message="the flow is suspended on its job",
    )
    return job
