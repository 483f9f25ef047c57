"""Declaring the cluster jobs a flow needs, and waiting for them without holding a process.

A flow re-runs from the top every time it is resumed. `require_job` is therefore
idempotent per (flow run, step): the first call declares the job (or reuses an identical
one), every later call returns that same job. `wait_for_jobs` suspends the flow run until
the reconciler has seen all the jobs end and resumes it.
"""

import dataclasses
import logging
from collections.abc import Iterable

from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.flow_runs import suspend_flow_run

from emg import waits
from emg.models import ClusterJob, ClusterJobState, JobWait
from emg.policies import ResubmitPolicy, Reuse
from slurm_adapter import JobSpec
from slurm_adapter.fingerprint import fingerprint, hash_inputs

logger = logging.getLogger(__name__)


def current_flow_run_id():
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("cluster jobs can only be required from inside a flow run")
    return context.flow_run.id


def declare_job(spec: JobSpec, inputs: Iterable[str] = (), policy: ResubmitPolicy = ResubmitPolicy()) -> ClusterJob:
    """The job to wait for: the live identical one, an ended one the policy reuses, or a new declaration."""
    input_hashes = hash_inputs(inputs)
    job_fingerprint = fingerprint(spec, input_hashes)
    identical = ClusterJob.objects.filter(fingerprint=job_fingerprint)
    live = identical.live().first()
    if live is not None:
        return live
    previous = identical.order_by("-created_at").first()
    if previous is not None and reusable(previous, policy):
        return previous
    if previous is not None and policy.prepare_on_resubmit:
        spec = with_preparation(spec, policy.prepare_on_resubmit)
    return ClusterJob.objects.declare(
        name=spec.name, fingerprint=job_fingerprint, spec=spec.to_dict(), input_hashes=input_hashes,
        policy=policy.to_dict(),
    )


def reusable(job: ClusterJob, policy: ResubmitPolicy) -> bool:
    if policy.max_age_seconds is not None and job.ended_at is not None:
        if (timezone.now() - job.ended_at).total_seconds() > policy.max_age_seconds:
            return False
    if policy.reuse == Reuse.ANY:
        return True
    if policy.reuse == Reuse.IF_SUCCEEDED:
        return job.state == ClusterJobState.COMPLETED
    return False


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
) -> int:
    """The id of the job this flow run needs at `step`; declared once, found again on every re-run."""
    flow_run_id = current_flow_run_id()
    wait = JobWait.objects.filter(flow_run_id=flow_run_id, step=step).first()
    if wait is None:
        job = declare_job(spec, inputs, policy)
        wait = waits.attach(flow_run_id, step, job.id, request_id)
    return wait.job_id


def wait_for_jobs(job_ids: list[int]) -> list[ClusterJob]:
    """Return the jobs once all have ended; until then, suspend this flow run.

    Each suspension uses a new deterministic key (the wait's suspension count), so a re-run
    never collides with an earlier suspension and never skips a wait it still needs. The
    jobs are checked just before suspending; one that ends after that check is caught by the
    reconciler, which resumes only runs that are actually suspended.
    """
    flow_run_id = current_flow_run_id()
    while True:
        close_old_connections()
        jobs = list(ClusterJob.objects.filter(id__in=job_ids).order_by("id"))
        if all(job.is_final for job in jobs):
            waits.release_for_run(flow_run_id, job_ids)
            return jobs
        round_number = waits.open_round(flow_run_id, job_ids)
        key = f"jobs-{job_ids[0]}-n{len(job_ids)}-wait-{round_number}"
        logger.info("suspending until cluster jobs %s end (key %s)", job_ids, key)
        # A long-lived process must not keep a connection the database may drop while we wait.
        close_old_connections()
        suspend_flow_run(timeout=settings.EMG_SUSPEND_TIMEOUT_SECONDS, key=key)
