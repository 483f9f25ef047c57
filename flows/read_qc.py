"""Study created -> raw-reads QC: fetch the study's runs from ENA, QC each run's reads on the cluster.

Started by the `study-created-qc` trigger (flows.triggers) when a Study is created flagged
`process_on_create`. It re-runs from the top at every resume:
- the runs it covers are fixed at its first fetch, in this flow run's StudyQC row; a resume reads
  them back and never asks ENA again (the fetches are cached tasks besides);
- one QC job per run, all declared together (`run_cluster_jobs`): one suspension for the lot, and
  one `sbatch --array` once there are at least EMG_ARRAY_MIN_TASKS of them;
- once every job has ended, each run's summary is judged against the thresholds in force
  (EMG_QC_MIN_READS, EMG_QC_MIN_Q30_PERCENT) and recorded with the study's totals, once (emg.qc).
"""

import json
import logging
import shlex
from pathlib import Path

from flows.django_setup import setup_django

setup_django()

from django.conf import settings  # noqa: E402
from prefect import flow, get_run_logger  # noqa: E402

from emg import qc as study_qc  # noqa: E402
from emg.connections import from_the_top_if_disconnected, once_more_if_disconnected  # noqa: E402
from emg.models import Run, RunQC, Study, StudyQC  # noqa: E402
from emg.policies import ResubmitPolicy, Reuse  # noqa: E402
from flows.cluster_jobs import JOB_DIR, RESULTS, current_flow_run_id  # noqa: E402
from flows.deployments import READ_QC_FLOW_NAME  # noqa: E402
from flows.ena import EnaError, EnaUnavailable, fetch_read_runs, fetch_study  # noqa: E402
from flows.steps import ClusterStep, ClusterStepFailed, run_cluster_jobs  # noqa: E402
from flows.study_records import read_urls, store_study_and_runs  # noqa: E402
from slurm_adapter import JobSpec  # noqa: E402

logger = logging.getLogger(__name__)
QC_OUTPUT = "qc_summary.json"
# A run's QC depends only on its reads and the pipeline: one that succeeded is reused by any study.
QC_POLICY = ResubmitPolicy(reuse=Reuse.IF_SUCCEEDED)
QC_TIME_LIMIT_MINUTES = 30
QC_MEMORY_MB = 256


class QCFailed(Exception):
    """Ends this QC failed, with a reason a person can act on."""


def runs_to_check(study: Study) -> tuple[StudyQC, list[Run]]:
    """This flow run's QC row and its runs: fetched from ENA on the first pass, read back after."""
    flow_run_id = current_flow_run_id()
    qc = StudyQC.objects.filter(study=study, flow_run_id=flow_run_id).first()
    if qc is None:
        try:
            records = fetch_study(study.accession), fetch_read_runs(study.accession)
            # Upserts in one transaction: cut off by a database restart, sent again whole.
            runs = once_more_if_disconnected(
                lambda: store_study_and_runs(study, *records), what=f"storing {study.accession}'s runs"
            )
        except (EnaError, EnaUnavailable) as error:
            failed = study_qc.begin(study, flow_run_id, [])
            study_qc.fail(failed, f"ENA: {error}")
            raise QCFailed(f"ENA: {error}") from error
        qc = study_qc.begin(study, flow_run_id, [run.accession for run in runs])
    return qc, list(Run.objects.filter(accession__in=qc.run_accessions).order_by("accession"))


def qc_step(run: Run) -> ClusterStep:
    reads = [arg for url in read_urls(run)[:2] for arg in ("--fastq", url)]
    spec = JobSpec(
        name=f"emg-qc-{run.accession}",
        command=(
            *shlex.split(settings.EMG_READ_QC_COMMAND),
            "--run",
            run.accession,
            *reads,
            "--outdir",
            f"{JOB_DIR}/{RESULTS}",
        ),
        work_dir=JOB_DIR,
        time_limit_minutes=QC_TIME_LIMIT_MINUTES,
        memory_mb=QC_MEMORY_MB,
        partition=settings.EMG_SLURM_PARTITION,
    )
    # Every run's job has this one shape (time, memory, partition): together they form one array.
    return ClusterStep(f"qc {run.accession}", spec, policy=QC_POLICY, outputs=(QC_OUTPUT,))


def why_failed(measured: dict) -> str:
    """ "" if the run passes the thresholds in force; else what it fell short of."""
    shortfalls = []
    if measured["reads"] < settings.EMG_QC_MIN_READS:
        shortfalls.append(f"{measured['reads']} reads, fewer than {settings.EMG_QC_MIN_READS}")
    if measured["q30_percent"] < settings.EMG_QC_MIN_Q30_PERCENT:
        shortfalls.append(
            f"{measured['q30_percent']}% of bases at Q30 or better, under {settings.EMG_QC_MIN_Q30_PERCENT:g}%"
        )
    return "; ".join(shortfalls)


def run_result(qc: StudyQC, run: Run, job) -> RunQC:
    path = Path(job.output_dir) / QC_OUTPUT
    try:
        measured = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise QCFailed(f"run {run.accession}: the QC output {path} is unreadable: {error}") from error
    reason = why_failed(measured)
    return RunQC(
        study_qc=qc,
        run=run,
        job=job,
        reads=measured["reads"],
        bases=measured["bases"],
        mean_quality=measured["mean_quality"],
        q30_percent=measured["q30_percent"],
        gc_percent=measured["gc_percent"],
        passed=not reason,
        failed_because=reason,
        summary=measured,
    )


def study_summary(results: list[RunQC], without_reads: list[str]) -> dict:
    return {
        "runs": len(results) + len(without_reads),
        "passed": sorted(result.run.accession for result in results if result.passed),
        "failed": {result.run.accession: result.failed_because for result in results if not result.passed},
        "without_reads": without_reads,
        "thresholds": {"min_reads": settings.EMG_QC_MIN_READS, "min_q30_percent": settings.EMG_QC_MIN_Q30_PERCENT},
    }


@flow(name=READ_QC_FLOW_NAME, persist_result=True)
@from_the_top_if_disconnected
def qc_raw_reads(study_id: int) -> dict:
    log = get_run_logger()
    study = Study.objects.get(id=study_id)
    try:
        qc, runs = runs_to_check(study)  # an ENA failure is recorded on a QC row of its own
    except QCFailed as failure:
        log.warning("QC of %s failed: %s", study.accession, failure)
        return {"error": str(failure)}
    if qc.finished_at is not None:
        return qc.summary  # recorded by an earlier pass of this run
    with_reads = [run for run in runs if run.fastq_ftp]
    try:
        if not with_reads:
            raise QCFailed(f"study {study.accession} has no read runs with reads in ENA: nothing to QC")
        try:
            jobs = run_cluster_jobs([qc_step(run) for run in with_reads])
        except ClusterStepFailed as failure:
            raise QCFailed(str(failure)) from failure
        results = [run_result(qc, run, job) for run, job in zip(with_reads, jobs, strict=True)]
    except QCFailed as failure:
        log.warning("QC of %s failed: %s", study.accession, failure)
        study_qc.fail(qc, str(failure))
        return {"error": str(failure)}
    summary = study_summary(results, sorted(run.accession for run in runs if not run.fastq_ftp))
    if not study_qc.finish(qc, results, summary):
        log.info("QC #%s of %s had been recorded already", qc.id, study.accession)
    log.info("QC of %s: %s of %s runs passed", study.accession, len(summary["passed"]), summary["runs"])
    return summary
