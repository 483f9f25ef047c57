"""The MGnify flow: fetch a study from ENA, assemble its reads, analyse the assembly, move the results.

It re-runs from the top at every resume, so each step is a cached task (the ENA fetches),
an idempotent upsert (the database rows), a file written once (the samplesheet), or a
cluster job found again through `require_job` (the pipelines).
"""

import dataclasses
import json
import shlex
from pathlib import Path

from flows.django_setup import setup_django

setup_django()

from django.conf import settings  # noqa: E402
from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from emg import requests  # noqa: E402
from emg.models import Analysis, AnalysisRequest, Assembly, ClusterJob, ClusterJobState  # noqa: E402
from emg.policies import ResubmitPolicy, Reuse  # noqa: E402
from flows.cluster_jobs import require_job, wait_for_jobs  # noqa: E402
from flows.deployments import ANALYSIS_FLOW_NAME  # noqa: E402
from flows.ena import EnaError, UnknownStudy, fetch_read_runs, fetch_study  # noqa: E402
from flows.nextflow_trace import parse_trace, summarise  # noqa: E402
from flows.study_records import ensure_samplesheet, store_study_and_runs  # noqa: E402
from slurm_adapter import JobSpec, tail_log  # noqa: E402

Status = AnalysisRequest.Status
TRACE_FILE = Path("pipeline_info") / "execution_trace.txt"
# Assembly is the expensive step: reuse an identical one that succeeded, run it again if it failed.
ASSEMBLY_POLICY = ResubmitPolicy(reuse=Reuse.IF_SUCCEEDED)
ANALYSIS_POLICY = ResubmitPolicy(reuse=Reuse.IF_SUCCEEDED)
# Moving data is cheap and must reflect the latest results: always do it again.
DATAMOVE_POLICY = ResubmitPolicy(reuse=Reuse.NEVER)


class StepFailed(Exception):
    """Ends the request FAILED with a reason a person can act on."""


def set_status(request: AnalysisRequest, status: str, *, step: str = "", reason: str = "") -> None:
    """Move this generation of an unfinished request on; an ended one (say, cancelled meanwhile) stays as it is."""
    requests.advance(request.id, request.generation, status, step=step, reason=reason)


def command(setting: str, *arguments: str) -> tuple[str, ...]:
    return (*shlex.split(setting), *arguments)


def pipeline_options(request: AnalysisRequest) -> list[str]:
    """The request's options as Nextflow-style `--name value` arguments (quoted when the script is built)."""
    options = []
    for name, value in sorted(request.pipeline_options.items()):
        options += [f"--{name.replace('_', '-')}", str(value)]
    return options


def study_dir(accession: str) -> Path:
    # Per study, not per request: identical work for two requests is one job (and one Nextflow -resume cache).
    return settings.EMG_WORK_DIR / "studies" / accession


def cluster_step(request: AnalysisRequest, step: str, spec: JobSpec, *, inputs=(), policy: ResubmitPolicy) -> ClusterJob:
    """Declare the step's job (once per flow run), wait for it suspended, and return it ended."""
    set_status(request, Status.RUNNING, step=step)
    job_id = require_job(step, spec, inputs=list(map(str, inputs)), policy=policy, request_id=request.id)
    declared = ClusterJob.objects.get(id=job_id)
    if not declared.is_final:  # a re-run past an ended job neither waits nor describes it again
        publish_job_artifact(declared, step)
        set_status(request, Status.WAITING, step=step)
    [job] = wait_for_jobs([job_id])
    set_status(request, Status.RUNNING, step=step)
    if job.state != ClusterJobState.COMPLETED:
        log_tail = tail_log(job.log_path, 8) if job.log_path else ""
        raise StepFailed(f"{step} failed: {job.outcome}" + (f"\nlast log lines:\n{log_tail}" if log_tail else ""))
    return job


def publish_job_artifact(job: ClusterJob, step: str) -> None:
    """The job's script, resources and links, in Prefect's UI beside the flow run."""
    spec = job.spec
    create_markdown_artifact(
        key=f"cluster-job-{job.id}",
        description=f"{step}: {job.name}",
        markdown="\n".join([
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
        ]),
    )


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise StepFailed(f"the pipeline's output {path} is missing or unreadable: {error}") from error


def store_trace(job: ClusterJob, outdir: Path) -> None:
    trace_path = outdir / TRACE_FILE
    if not trace_path.exists():
        return
    tasks = parse_trace(trace_path.read_text())
    trace = {"summary": summarise(tasks), "tasks": [dataclasses.asdict(task) for task in tasks]}
    # Round-trip through JSON so datetimes become ISO strings the JSONField can hold.
    ClusterJob.objects.filter(id=job.id).update(trace=json.loads(json.dumps(trace, default=str)))


def assemble(request: AnalysisRequest, runs) -> Assembly:
    work = study_dir(request.study.accession)
    samplesheet = ensure_samplesheet(work / "samplesheet.csv", runs)
    outdir = work / "assembly"
    spec = JobSpec(
        name=f"emg-assembly-{request.study.accession}",
        command=command(settings.EMG_ASSEMBLY_COMMAND, "--samplesheet", str(samplesheet), "--outdir", str(outdir),
                        *pipeline_options(request)),
        work_dir=str(work),
        time_limit_minutes=settings.EMG_PIPELINE_TIME_LIMIT_MINUTES,
        memory_mb=settings.EMG_PIPELINE_MEMORY_MB,
        partition=settings.EMG_SLURM_PARTITION,
    )
    job = cluster_step(request, "assembly", spec, inputs=[samplesheet], policy=ASSEMBLY_POLICY)
    stats = read_json(outdir / "assembly_stats.json")
    store_trace(job, outdir)
    assembly, _ = Assembly.objects.update_or_create(
        request=request,
        defaults={
            "study": request.study, "job": job, "contigs": stats["contigs"], "total_length": stats["total_length"],
            "n50": stats["n50"], "stats": stats, "results_path": str(outdir), "analysis_skipped_reason": "",
        },
    )
    return assembly


def analyse(request: AnalysisRequest, assembly: Assembly) -> Analysis:
    work = study_dir(request.study.accession)
    outdir = work / "analysis"
    spec = JobSpec(
        name=f"emg-analysis-{request.study.accession}",
        command=command(settings.EMG_ANALYSIS_COMMAND, "--contigs", str(Path(assembly.results_path) / "contigs.fasta"),
                        "--outdir", str(outdir)),
        work_dir=str(work),
        time_limit_minutes=settings.EMG_PIPELINE_TIME_LIMIT_MINUTES,
        memory_mb=settings.EMG_PIPELINE_MEMORY_MB,
        partition=settings.EMG_SLURM_PARTITION,
    )
    job = cluster_step(request, "analysis", spec, inputs=[Path(assembly.results_path) / "contigs.fasta"],
                       policy=ANALYSIS_POLICY)
    store_trace(job, outdir)
    analysis, _ = Analysis.objects.update_or_create(
        request=request,
        defaults={"assembly": assembly, "job": job, "summary": read_json(outdir / "analysis_summary.json"),
                  "results_path": str(outdir)},
    )
    return analysis


def move_results(request: AnalysisRequest) -> Path:
    work = study_dir(request.study.accession)
    destination = settings.EMG_RESULTS_DIR / request.study.accession / f"request-{request.id}"
    spec = JobSpec(
        name=f"emg-datamove-{request.study.accession}",
        command=command(settings.EMG_DATAMOVE_COMMAND, str(work), str(destination)),
        work_dir=str(work),
        time_limit_minutes=60,
        memory_mb=256,
        partition=settings.EMG_DATAMOVER_PARTITION,
    )
    cluster_step(request, "data move", spec, policy=DATAMOVE_POLICY)
    return destination


@flow(name=ANALYSIS_FLOW_NAME, persist_result=True)
def analyse_study(request_id: int, generation: int = 1) -> str:
    logger = get_run_logger()
    request = AnalysisRequest.objects.select_related("study").get(id=request_id)
    if request.generation != generation:
        logger.info("request #%s is at generation %s; this run (generation %s) stops", request_id,
                    request.generation, generation)
        return "superseded"
    if request.is_final:
        return request.status
    accession = request.study.accession
    try:
        set_status(request, Status.RUNNING, step="fetching from ENA")
        try:
            study_record = fetch_study(accession)
            run_records = fetch_read_runs(accession)
        except UnknownStudy as error:
            raise StepFailed(f"{error}: check the accession") from error
        except EnaError as error:
            raise StepFailed(f"ENA: {error}") from error
        if not run_records:
            raise StepFailed(f"study {accession} has no read runs in ENA: nothing to assemble")
        runs = store_study_and_runs(request.study, study_record, run_records)

        assembly = assemble(request, runs)
        if assembly.total_length >= settings.EMG_MIN_ASSEMBLY_LENGTH:
            analyse(request, assembly)
        else:
            reason = (f"assembly too small to analyse: {assembly.total_length} bp in {assembly.contigs} contigs "
                      f"(minimum {settings.EMG_MIN_ASSEMBLY_LENGTH} bp)")
            Assembly.objects.filter(id=assembly.id).update(analysis_skipped_reason=reason)
            logger.info("request #%s: %s", request_id, reason)
        destination = move_results(request)
    except StepFailed as failure:
        logger.warning("request #%s failed: %s", request_id, failure)
        set_status(request, Status.FAILED, step=AnalysisRequest.objects.get(id=request_id).current_step,
                   reason=str(failure))
        return Status.FAILED
    set_status(request, Status.COMPLETED, reason=f"results in {destination}")
    return Status.COMPLETED
