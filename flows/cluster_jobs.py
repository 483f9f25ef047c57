"""Declaring the cluster jobs a flow needs, and waiting for them without holding a process.

A flow re-runs from the top every time it is resumed. `require_job` is therefore
idempotent per (flow run, step): the first call declares the job (or reuses an identical
one), every later call returns that same job. `wait_for_jobs` suspends the flow run until
the reconciler has seen all the jobs end and resumes it.
"""

import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import cast

from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.flow_runs import suspend_flow_run

from emg import jobs, waits
from emg.models import ClusterJob, ClusterJobState, JobWait
from emg.policies import ResubmitPolicy, Reuse
from slurm_adapter import JobSpec
from slurm_adapter.fingerprint import file_sha256, fingerprint, hash_inputs

logger = logging.getLogger(__name__)

# Stands, in a spec's work dir and command, for the job's own directory: EMG_WORK_DIR/jobs/<fingerprint>.
# The fingerprint is taken over the spec as written (so it cannot depend on the directory it names),
# then the placeholder is replaced. Each job therefore runs, keeps its log, Nextflow's launch dir,
# work/ and -resume cache, and writes its results, in a directory no job with other work shares.
JOB_DIR = "/@emg-job-dir@"
RESULTS = "results"


def job_dir(job_fingerprint: str) -> Path:
    return settings.EMG_WORK_DIR / "jobs" / job_fingerprint


def in_job_dir(spec: JobSpec, directory: Path) -> JobSpec:
    """The spec with every mention of JOB_DIR (in its work dir and its arguments) made `directory`."""
    return dataclasses.replace(
        spec,
        work_dir=spec.work_dir.replace(JOB_DIR, str(directory)),
        command=tuple(argument.replace(JOB_DIR, str(directory)) for argument in spec.command),
    )


def current_flow_run_id():
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("cluster jobs can only be required from inside a flow run")
    return context.flow_run.id


def declare_job(
    spec: JobSpec, inputs: Iterable[str] = (), policy: ResubmitPolicy = ResubmitPolicy(), outputs: Sequence[str] = ()
) -> ClusterJob:
    """The job to wait for: the live identical one, an ended one the policy reuses, or a new declaration.

    `outputs` are the files (relative to the job's output dir, `<job dir>/results`) the job must
    produce; an ended job is reused only while they still exist and still hash to its manifest.
    """
    input_hashes = hash_inputs(inputs)
    job_fingerprint = fingerprint(spec, input_hashes)
    directory = job_dir(job_fingerprint)
    identical = ClusterJob.objects.filter(fingerprint=job_fingerprint)
    live = identical.wanted().first()  # one given up (being cancelled) is not waited for
    if live is not None:
        return live
    previous = identical.order_by("-created_at").first()
    if previous is not None and reusable(previous, policy):
        return previous
    if previous is not None and policy.prepare_on_resubmit:
        spec = with_preparation(spec, policy.prepare_on_resubmit)
    return ClusterJob.objects.declare(
        name=spec.name,
        fingerprint=job_fingerprint,
        spec=in_job_dir(spec, directory).to_dict(),
        input_hashes=input_hashes,
        policy=policy.to_dict(),
        output_dir=str(directory / RESULTS),
        outputs=sorted(set(outputs)),
    )


def reusable(job: ClusterJob, policy: ResubmitPolicy) -> bool:
    if policy.max_age_seconds is not None and job.ended_at is not None:
        if (timezone.now() - job.ended_at).total_seconds() > policy.max_age_seconds:
            return False
    if policy.reuse == Reuse.ANY:
        return job.state != ClusterJobState.COMPLETED or outputs_intact(job)
    if policy.reuse == Reuse.IF_SUCCEEDED:
        return job.state == ClusterJobState.COMPLETED and outputs_intact(job)
    return False


class OutputsMissing(Exception):
    """A job that COMPLETED did not leave one of its declared outputs."""


def record_manifest(job: ClusterJob) -> dict[str, str]:
    """The sha256 of each declared output of this COMPLETED job, recorded on its row the first time.

    The flow that first sees the job ended records it (not the job: in production the job is a
    Nextflow pipeline we do not change, and the row, not a file beside the outputs, is what nobody
    else can edit). Nothing but this job writes in its content-addressed directory, so what the
    first reader hashes is what the job wrote. Raises OutputsMissing if a declared output is absent.
    """
    if job.output_manifest is not None:
        return job.output_manifest
    manifest = {}
    for name in job.outputs:
        path = Path(job.output_dir) / name
        if not path.is_file():
            raise OutputsMissing(f"cluster job #{job.id} completed but its declared output {path} does not exist")
        manifest[name] = file_sha256(path)
    # Compare-and-set: of two flows seeing the job end at once, one records and both read the same.
    jobs.record_manifest(job, manifest)
    job.refresh_from_db(fields=["output_manifest", "manifest_recorded_at"])
    return cast(dict[str, str], job.output_manifest)


def manifest_problems(job: ClusterJob) -> list[str]:
    """What is wrong with the job's recorded outputs now: missing, altered, or unlisted files."""
    manifest = job.output_manifest or {}
    problems = [f"{name} is not in the manifest" for name in job.outputs if name not in manifest]
    for name, expected in sorted(manifest.items()):
        path = Path(job.output_dir) / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif file_sha256(path) != expected:
            problems.append(f"{path} no longer matches its sha256 {expected[:12]}")
    return problems


def outputs_intact(job: ClusterJob) -> bool:
    """An ended COMPLETED job's declared outputs exist and hash to its manifest (recorded now if it never was)."""
    try:
        record_manifest(job)
    except OutputsMissing as error:
        logger.warning("not reusing: %s", error)
        return False
    problems = manifest_problems(job)
    if problems:
        logger.warning(
            "not reusing cluster job #%s (fingerprint %s): %s", job.id, job.fingerprint[:16], "; ".join(problems)
        )
    return not problems


def with_preparation(spec: JobSpec, preparation: str) -> JobSpec:
    """Run `preparation` (trusted shell from flow code) first, then the job's own argv, unchanged."""
    wrapped = ("bash", "-c", f'{preparation}\nexec "$@"', "emg-prepared-job", *spec.command)
    return dataclasses.replace(spec, command=wrapped)


# Idempotent through the database, so Prefect's cache is not needed (nor wanted: it cannot see our rows).
@task(name="require-cluster-job", cache_policy=NO_CACHE)
def require_job(
    step: str,
    spec: JobSpec,
    inputs: Iterable[str] = (),
    policy: ResubmitPolicy = ResubmitPolicy(),
    request_id: int | None = None,
    outputs: Sequence[str] = (),
) -> int:
    """The id of the job this flow run needs at `step`; declared once, found again on every re-run."""
    flow_run_id = current_flow_run_id()
    wait = JobWait.objects.filter(flow_run_id=flow_run_id, step=step).first()
    while wait is None:
        job = declare_job(spec, inputs, policy, outputs)
        # None: the reconciler gave that job up between our read and our wait; declare again (a
        # new row now, as declare_job skips a job given up).
        wait = waits.attach(flow_run_id, step, job.id, request_id)
    return wait.job_id


def suspend_key(job_ids: Iterable[int], round_number: int) -> str:
    """The key of one round of waiting for this set of jobs: the same for the same set (in any order)
    and round, and another for any other set or round.

    Prefect fires a pause key once per flow run: a suspension under a key the run used before is
    refused and the flow carries on as if resumed, without its jobs. Hence the whole set (its ids
    hashed: a fan-in of many jobs would not fit in a key) and the round are in the key.
    """
    ids = sorted(set(job_ids))
    digest = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]
    return f"jobs-{ids[0]}-n{len(ids)}-{digest}-wait-{round_number}"


def wait_for_jobs(job_ids: list[int]) -> list[ClusterJob]:
    """Return the jobs once all have ended; until then, suspend this flow run (once for all of them).

    Each suspension uses a new deterministic key (`suspend_key`: the set of jobs and the waits'
    suspension count), so a re-run never collides with an earlier suspension and never skips a wait
    it still needs. The jobs are checked just before suspending; one that ends after that check is
    caught by the reconciler, which resumes only runs that are actually suspended.
    """
    flow_run_id = current_flow_run_id()
    while True:
        close_old_connections()
        jobs = list(ClusterJob.objects.filter(id__in=job_ids).order_by("id"))
        if all(job.is_final for job in jobs):
            waits.release_for_run(flow_run_id, job_ids, "flow", "its jobs had ended when it looked")
            return jobs
        round_number = waits.open_round(waits.rounds_read(flow_run_id, job_ids))
        if round_number is None:
            # Another process of this flow run (one taken for a zombie) opened a round since our
            # read: look at the jobs again and take a round of our own, never share its key.
            logger.info("waits for cluster jobs %s re-opened meanwhile; reading them again", job_ids)
            continue
        key = suspend_key(job_ids, round_number)
        logger.info("suspending until cluster jobs %s end (key %s)", job_ids, key)
        # A long-lived process must not keep a connection the database may drop while we wait.
        close_old_connections()
        suspend_flow_run(timeout=settings.EMG_SUSPEND_TIMEOUT_SECONDS, key=key)
