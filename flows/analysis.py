"""The MGnify flow: fetch a study from ENA, assemble its reads, analyse the assembly, move the results.

It re-runs from the top at every resume, so each step is done once per generation and found
again: the row is validated first (before anything is fetched or submitted), the ENA fetch is
stored on the request (a resume reads the stored rows, and never asks ENA again), the samplesheet
is a file named by its content, and each cluster step is one call (`flows.steps.run_cluster_job`)
that finds its job again.

Each job works in its own directory, named by its fingerprint (`flows.cluster_jobs.JOB_DIR`), and
a request reads only its own jobs' declared outputs, verified against their recorded sha256.
"""

import dataclasses
import json
import logging
import os
import shlex
from datetime import timedelta
from pathlib import Path
from typing import Any

from flows.django_setup import setup_django

setup_django()

from django.conf import settings  # noqa: E402
from django.core.exceptions import ValidationError  # noqa: E402
from django.utils import timezone  # noqa: E402
from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from emg import requests  # noqa: E402
from emg.connections import from_the_top_if_disconnected, once_more_if_disconnected  # noqa: E402
from emg.models import Analysis, AnalysisRequest, Assembly, ClusterJob, Run  # noqa: E402
from emg.pipeline_options import option_arguments, resolved_options  # noqa: E402
from emg.policies import ResubmitPolicy, Reuse  # noqa: E402
from flows.cluster_jobs import JOB_DIR, RESULTS  # noqa: E402
from flows.deployments import ANALYSIS_FLOW_NAME  # noqa: E402
from flows.ena import EnaError, EnaUnavailable, UnknownStudy, fetch_read_runs, fetch_study  # noqa: E402
from flows.nextflow_trace import parse_trace, summarise  # noqa: E402
from flows.steps import ClusterStep, ClusterStepFailed, run_cluster_job  # noqa: E402
from flows.study_records import content_addressed, ensure_samplesheet, store_study_and_runs  # noqa: E402
from slurm_adapter import JobSpec  # noqa: E402

logger = logging.getLogger(__name__)
Status = AnalysisRequest.Status
TRACE_FILE = Path("pipeline_info") / "execution_trace.txt"
# Assembly is the expensive step: reuse an identical one that succeeded, run it again if it failed.
ASSEMBLY_POLICY = ResubmitPolicy(reuse=Reuse.IF_SUCCEEDED)
ANALYSIS_POLICY = ResubmitPolicy(reuse=Reuse.IF_SUCCEEDED)
# Moving data is cheap and must reflect the latest results: always do it again.
DATAMOVE_POLICY = ResubmitPolicy(reuse=Reuse.NEVER)
# What each pipeline must leave in its output dir: hashed when the job ends, verified before reuse, moved.
ASSEMBLY_OUTPUTS = ("assembly_stats.json", "contigs.fasta")
ANALYSIS_OUTPUTS = ("analysis_summary.json", "predicted_orfs.faa")
# The job's output dir, as its command names it (the job dir is filled in when the job is declared).
OUTDIR = f"{JOB_DIR}/{RESULTS}"


class StepFailed(Exception):
    """Ends the request FAILED with a reason a person can act on."""


class Deferred(Exception):
    """Ends this flow run, not the request: the request is deferred and the reconciler runs it again later."""


def set_status(request: AnalysisRequest, status: str, *, step: str = "", reason: str = "") -> None:
    """Move this generation of an unfinished request on; an ended one (say, cancelled meanwhile) stays as it is.

    A process the reconciler took for a zombie and re-ran (it was frozen with its runner, say, and
    continued) finds here that a re-run was counted since it started, and exits at once: the run
    belongs to its new process now, which this one must neither report for nor mark Failed or
    Crashed in Prefect. Exit status 0, so its runner reports nothing either.
    """
    if requests.advance(
        request.id, request.generation, status, step=step, reason=reason, flow_reruns=request.flow_reruns
    ):
        return
    if requests.superseded(request):
        logger.warning(
            "request #%s was re-run (re-run %s counted) while this flow process (pid %s) was silent; "
            "it leaves the run to its new process",
            request.id,
            request.flow_reruns + 1,
            os.getpid(),
        )
        logging.shutdown()
        os._exit(0)


def command(setting: str, *arguments: str) -> tuple[str, ...]:
    return (*shlex.split(setting), *arguments)


def study_dir(accession: str) -> Path:
    # Per study: only the operator-editable samplesheet lives here; jobs work in their own directories.
    return settings.EMG_WORK_DIR / "studies" / accession


def invalid_request_reason(request: AnalysisRequest) -> str:
    """Why this row must not run, or "": rows written around the model (bulk_create, SQL) are checked here."""
    try:
        request.study.full_clean(validate_unique=False)
        request.full_clean(validate_unique=False)
    except ValidationError as error:
        return "invalid request: " + "; ".join(
            f"{field}: {' '.join(messages)}" if field != "__all__" else " ".join(messages)
            for field, messages in error.message_dict.items()
        )
    return ""


def cluster_step(request: AnalysisRequest, step: ClusterStep) -> ClusterJob:
    """The step's job, ended and verified (flows.steps.run_cluster_job), the request's status following it:
    RUNNING at the step, WAITING while the flow run is suspended on the job (its artifact published)."""
    set_status(request, Status.RUNNING, step=step.name)

    def waiting(pending: dict[str, ClusterJob]) -> None:
        for name, job in pending.items():
            publish_job_artifact(job, name)
        set_status(request, Status.WAITING, step=step.name)

    try:
        job = run_cluster_job(step, request_id=request.id, on_wait=waiting)
    except ClusterStepFailed:
        set_status(request, Status.RUNNING, step=step.name)  # it has ended: the flow fails the request next
        raise
    # Not in a `finally`: suspending raises (Prefect's Pause) through here, and the request stays WAITING.
    set_status(request, Status.RUNNING, step=step.name)
    return job


def publish_job_artifact(job: ClusterJob, step: str) -> None:
    """The job's script, resources and links, in Prefect's UI beside the flow run."""
    spec = job.spec
    create_markdown_artifact(
        key=f"cluster-job-{job.id}",
        description=f"{step}: {job.name}",
        markdown="\n".join(
            [
                f"### {step}: `{job.name}`",
                f"- cluster job #{job.id}, fingerprint `{job.fingerprint[:16]}`, state **{job.state}**",
                f"- resources: {spec['cpus']} CPUs, {spec['memory_mb']} MB, {spec['time_limit_minutes']} min, "
                f"partition `{spec.get('partition') or 'default'}`",
                f"- work dir: `{spec['work_dir']}`",
                f"- admin: /admin/emg/clusterjob/{job.id}/change/",
                "",
                "```sh",
                shlex.join(spec["command"]),
                "```",
            ]
        ),
    )


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise StepFailed(f"the pipeline's output {path} is missing or unreadable: {error}") from error


def store_trace(job: ClusterJob, outdir: Path) -> None:
    """Record the job's Nextflow trace; one that cannot be read is recorded as such and fails nothing."""
    trace_path = outdir / TRACE_FILE
    if not trace_path.exists():
        return
    trace: dict[str, Any]
    try:
        tasks = parse_trace(trace_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        trace = {"error": f"malformed Nextflow trace {trace_path}: {error}"[:2000], "summary": None, "tasks": []}
    else:
        trace = {"summary": summarise(tasks), "tasks": [dataclasses.asdict(task) for task in tasks]}
    # Round-trip through JSON so datetimes become ISO strings the JSONField can hold.
    ClusterJob.objects.filter(id=job.id).update(trace=json.loads(json.dumps(trace, default=str)))


def study_runs(request: AnalysisRequest, generation: int) -> list[Run]:
    """The runs this generation fetched from ENA: fetched and stored once, read back on every resume.

    Only the first fetch of a generation asks ENA (its transient errors are retried with backoff by
    the fetch tasks); once stored, no outage or rate limit can end the request. A first fetch whose
    retries all met an outage defers the request (`defer_for_ena`): an outage is never a verdict.
    """
    if request.ena_fetched_generation == generation:
        runs = list(Run.objects.filter(accession__in=request.ena_runs).select_related("sample"))
        if len(runs) == len(request.ena_runs):
            return runs
    accession = request.study.accession
    try:
        study_record = fetch_study(accession)
        run_records = fetch_read_runs(accession)
    except UnknownStudy as error:
        raise StepFailed(f"{error}: check the accession") from error
    except EnaError as error:
        raise StepFailed(f"ENA: {error}") from error
    except EnaUnavailable as error:
        defer_for_ena(request, generation, error)
    if not run_records:
        raise StepFailed(f"study {accession} has no read runs in ENA: nothing to assemble")
    # One transaction of upserts: cut off by a database restart, it rolled back whole and is sent again.
    runs = once_more_if_disconnected(
        lambda: store_study_and_runs(request.study, study_record, run_records), what=f"storing {accession}'s runs"
    )
    requests.record_ena_fetch(request.id, generation, [run.accession for run in runs])
    return runs


def defer_for_ena(request: AnalysisRequest, generation: int, error: EnaUnavailable) -> None:
    """End this flow run and have the reconciler run it again later, holding no process meanwhile;
    after `EMG_ENA_MAX_DEFERRALS` deferrals the outage fails the request."""
    if request.deferrals >= settings.EMG_ENA_MAX_DEFERRALS:
        raise StepFailed(
            f"ENA has been unavailable for {request.deferrals + 1} attempts over this request's "
            f"first fetch (last: {error}); re-run it once ENA answers"
        ) from error
    delay = min(settings.EMG_ENA_DEFER_SECONDS * 2**request.deferrals, settings.EMG_ENA_DEFER_MAX_SECONDS)
    until = timezone.now() + timedelta(seconds=delay)
    requests.defer(request.id, generation, until, f"waiting for ENA, unavailable: {error}")
    raise Deferred(f"ENA unavailable ({error}); request #{request.id} runs again at {until.isoformat()}") from error


def assemble(request: AnalysisRequest, runs) -> Assembly:
    editable = ensure_samplesheet(study_dir(request.study.accession) / "samplesheet.csv", runs)
    # The job reads a copy named by its content: no later edit or rewrite can change what it read.
    samplesheet = content_addressed(editable, settings.EMG_WORK_DIR / "samplesheets")
    options = resolved_options("assembly", request.pipeline_options)
    spec = JobSpec(
        name=f"emg-assembly-{request.study.accession}",
        # Our own arguments last: a pipeline taking the last of repeated options still gets ours.
        command=command(
            settings.EMG_ASSEMBLY_COMMAND,
            *option_arguments(options),
            "--samplesheet",
            str(samplesheet),
            "--outdir",
            OUTDIR,
        ),
        work_dir=JOB_DIR,
        time_limit_minutes=settings.EMG_PIPELINE_TIME_LIMIT_MINUTES,
        memory_mb=settings.EMG_PIPELINE_MEMORY_MB,
        partition=settings.EMG_SLURM_PARTITION,
    )
    job = cluster_step(
        request, ClusterStep("assembly", spec, inputs=[samplesheet], policy=ASSEMBLY_POLICY, outputs=ASSEMBLY_OUTPUTS)
    )
    outdir = Path(job.output_dir)
    stats = read_json(outdir / "assembly_stats.json")
    store_trace(job, outdir)
    assembly, _ = Assembly.objects.update_or_create(
        request=request,
        defaults={
            "study": request.study,
            "job": job,
            "contigs": stats["contigs"],
            "total_length": stats["total_length"],
            "n50": stats["n50"],
            "stats": stats,
            "results_path": str(outdir),
            "analysis_skipped_reason": "",
        },
    )
    return assembly


def analyse(request: AnalysisRequest, assembly: Assembly) -> Analysis:
    contigs = Path(assembly.job.output_dir) / "contigs.fasta"
    spec = JobSpec(
        name=f"emg-analysis-{request.study.accession}",
        command=command(settings.EMG_ANALYSIS_COMMAND, "--contigs", str(contigs), "--outdir", OUTDIR),
        work_dir=JOB_DIR,
        time_limit_minutes=settings.EMG_PIPELINE_TIME_LIMIT_MINUTES,
        memory_mb=settings.EMG_PIPELINE_MEMORY_MB,
        partition=settings.EMG_SLURM_PARTITION,
    )
    job = cluster_step(
        request, ClusterStep("analysis", spec, inputs=[contigs], policy=ANALYSIS_POLICY, outputs=ANALYSIS_OUTPUTS)
    )
    outdir = Path(job.output_dir)
    store_trace(job, outdir)
    analysis, _ = Analysis.objects.update_or_create(
        request=request,
        defaults={
            "assembly": assembly,
            "job": job,
            "summary": read_json(outdir / "analysis_summary.json"),
            "results_path": str(outdir),
        },
    )
    return analysis


def declared_outputs(jobs: dict[str, ClusterJob]) -> list[str]:
    """`<step>/<name>:<sha256>:<source>` for each declared output of these jobs (this request's own)."""
    return [
        f"{step}/{name}:{sha256}:{Path(job.output_dir) / name}"
        for step, job in jobs.items()
        for name, sha256 in sorted((job.output_manifest or {}).items())
    ]


def move_results(request: AnalysisRequest, jobs: dict[str, ClusterJob]) -> Path:
    destination = settings.EMG_RESULTS_DIR / request.study.accession / f"request-{request.id}"
    spec = JobSpec(
        name=f"emg-datamove-{request.study.accession}",
        # Only the declared outputs, each checked against the sha256 recorded when its job ended:
        # never another request's files, a job log, or Nextflow's work/.
        command=command(settings.EMG_DATAMOVE_COMMAND, "--files", str(destination), *declared_outputs(jobs)),
        work_dir=JOB_DIR,
        time_limit_minutes=60,
        memory_mb=256,
        partition=settings.EMG_DATAMOVER_PARTITION,
    )
    cluster_step(request, ClusterStep("data move", spec, policy=DATAMOVE_POLICY))
    return destination


@flow(name=ANALYSIS_FLOW_NAME, persist_result=True)
@from_the_top_if_disconnected
def analyse_study(request_id: int, generation: int = 1) -> str:
    logger = get_run_logger()
    request = AnalysisRequest.objects.select_related("study").get(id=request_id)
    if request.generation != generation:
        logger.info(
            "request #%s is at generation %s; this run (generation %s) stops",
            request_id,
            request.generation,
            generation,
        )
        return "superseded"
    if request.is_final:
        return request.status
    invalid = invalid_request_reason(request)
    if invalid:
        logger.warning("request #%s cannot run: %s", request_id, invalid)
        set_status(request, Status.FAILED, step="validating the request", reason=invalid)
        return Status.FAILED
    try:
        set_status(request, Status.RUNNING, step="fetching from ENA")
        runs = study_runs(request, generation)

        assembly = assemble(request, runs)
        jobs = {"assembly": assembly.job}
        if assembly.total_length >= settings.EMG_MIN_ASSEMBLY_LENGTH:
            jobs["analysis"] = analyse(request, assembly).job
        else:
            reason = (
                f"assembly too small to analyse: {assembly.total_length} bp in {assembly.contigs} contigs "
                f"(minimum {settings.EMG_MIN_ASSEMBLY_LENGTH} bp)"
            )
            Assembly.objects.filter(id=assembly.id).update(analysis_skipped_reason=reason)
            logger.info("request #%s: %s", request_id, reason)
        destination = move_results(request, jobs)
    except (StepFailed, ClusterStepFailed) as failure:
        logger.warning("request #%s failed: %s", request_id, failure)
        set_status(
            request, Status.FAILED, step=AnalysisRequest.objects.get(id=request_id).current_step, reason=str(failure)
        )
        return Status.FAILED
    set_status(request, Status.COMPLETED, reason=f"results in {destination}")
    return Status.COMPLETED
