"""The analysis flow: declare the study's pipeline job on the cluster, wait, record the outcome.

It re-runs from the top on every resume: each step below is either an idempotent update
or finds what an earlier run of it already did.
"""

import shlex

from flows.django_setup import setup_django

setup_django()

from django.conf import settings  # noqa: E402
from django.utils import timezone  # noqa: E402
from prefect import flow, get_run_logger  # noqa: E402

from emg.models import AnalysisRequest, ClusterJobState  # noqa: E402
from flows.cluster_jobs import require_job, wait_for_jobs  # noqa: E402
from flows.deployments import ANALYSIS_FLOW_NAME  # noqa: E402
from slurm_adapter import JobSpec  # noqa: E402

Status = AnalysisRequest.Status


def set_status(request_id: int, status: str, *, step: str = "", reason: str = "") -> None:
    """Move an unfinished request on; an ended one (say, cancelled meanwhile) stays as it is."""
    finished_at = timezone.now() if status in AnalysisRequest.FINAL_STATUSES else None
    AnalysisRequest.objects.filter(id=request_id).exclude(status__in=AnalysisRequest.FINAL_STATUSES).update(
        status=status, current_step=step, status_reason=reason, finished_at=finished_at
    )


def pipeline_job_spec(request: AnalysisRequest) -> JobSpec:
    accession = request.study.accession
    work_dir = settings.EMG_WORK_DIR / "studies" / accession / f"request-{request.id}"
    options = []
    for name, value in sorted(request.pipeline_options.items()):
        options += [f"--{name.replace('_', '-')}", str(value)]
    return JobSpec(
        name=f"emg-analysis-{accession}",
        command=(*shlex.split(settings.EMG_PIPELINE_COMMAND), "--study", accession, "--outdir",
                 str(work_dir / "results"), *options),
        work_dir=str(work_dir),
        time_limit_minutes=settings.EMG_PIPELINE_TIME_LIMIT_MINUTES,
        memory_mb=settings.EMG_PIPELINE_MEMORY_MB,
        partition=settings.EMG_SLURM_PARTITION,
    )


@flow(name=ANALYSIS_FLOW_NAME, persist_result=True)
def analyse_study(request_id: int, generation: int = 1) -> str:
    logger = get_run_logger()
    request = AnalysisRequest.objects.select_related("study").get(id=request_id)
    if request.generation != generation:
        logger.info("request #%s is at generation %s; this run (generation %s) stops", request_id,
                    request.generation, generation)
        return "superseded"
    if request.status in AnalysisRequest.FINAL_STATUSES:
        return request.status

    set_status(request_id, Status.RUNNING, step="analysis")
    job_id = require_job("analysis", pipeline_job_spec(request), request_id=request_id)
    set_status(request_id, Status.WAITING, step="analysis")
    [job] = wait_for_jobs([job_id])

    if job.state == ClusterJobState.COMPLETED:
        set_status(request_id, Status.COMPLETED, reason=job.outcome)
    else:
        set_status(request_id, Status.FAILED, step="analysis", reason=job.outcome)
    logger.info("request #%s: %s", request_id, job.outcome)
    return job.state
