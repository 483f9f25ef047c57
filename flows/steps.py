"""One call per cluster step, for flow authors: declare, wait suspended, verify.

    [job] = run_cluster_jobs([ClusterStep("assembly", spec, inputs=[samplesheet], outputs=OUTPUTS)])

`run_cluster_job` and `run_cluster_jobs` hide what a flow on our cluster must otherwise get right
at every step: a flow re-runs from the top at every resume (each step is found again through its
JobWait row, so nothing is declared twice), the suspension key of each round, the resubmit policy,
and the check of the ended job (COMPLETED, its declared outputs present and unchanged). A fan-out
of many jobs suspends the flow run once and is resumed once, when the last of them has ended.
See docs/writing-flows.md.
"""

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from django.db import transaction

from emg.models import ClusterJob, ClusterJobState
from emg.policies import ResubmitPolicy
from flows.cluster_jobs import OutputsMissing, manifest_problems, record_manifest, require_job, wait_for_jobs
from slurm_adapter import JobSpec, tail_log

logger = logging.getLogger(__name__)

# How much of a failed job's log its error carries: enough for the pipeline's own last words.
LOG_TAIL_LINES = 8
# JobWait.step's column width: a longer name could not be recorded.
MAX_STEP_NAME = 64


@dataclasses.dataclass(frozen=True)
class ClusterStep:
    """One cluster job a flow needs, named by the step that needs it.

    `name` identifies the step within its flow run (a re-run finds the job declared for it again),
    so each step of a run has its own: a fan-out names its jobs, e.g. f"analysis[{index}]".
    `inputs` are the files the job reads (their content is part of its fingerprint), `outputs` the
    files it must leave in its output dir (hashed when it ends, verified before anyone reuses it).
    """

    name: str
    spec: JobSpec
    inputs: Sequence[str | Path] = ()
    policy: ResubmitPolicy = ResubmitPolicy()
    outputs: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > MAX_STEP_NAME:
            raise ValueError(f"a step's name must be 1 to {MAX_STEP_NAME} characters, not {self.name!r}")


@dataclasses.dataclass(frozen=True)
class StepFailure:
    """Why one step's job is no result: it did not complete, or its outputs are not what it left."""

    step: str
    job: ClusterJob
    reason: str
    log_tail: str = ""

    def __str__(self) -> str:
        return self.reason + (f"\nlast log lines:\n{self.log_tail}" if self.log_tail else "")


class ClusterStepFailed(Exception):
    """One or more steps' jobs ended without a result; raised once all the steps' jobs have ended."""

    def __init__(self, failures: Sequence[StepFailure], of: int = 1):
        self.failures = list(failures)
        if len(self.failures) == 1:
            message = str(self.failures[0])
        else:
            names = ", ".join(failure.step for failure in self.failures)
            message = f"{len(self.failures)} of {of} cluster steps failed ({names}):\n" + "\n".join(
                str(failure) for failure in self.failures
            )
        super().__init__(message)

    @property
    def steps(self) -> list[str]:
        return [failure.step for failure in self.failures]


# Called with the steps whose jobs have not ended yet (step name to job), just before the flow run suspends.
OnWait = Callable[[dict[str, ClusterJob]], None]


def run_cluster_job(step: ClusterStep, *, request_id: int | None = None, on_wait: OnWait | None = None) -> ClusterJob:
    """The step's job, ended and verified: declared once per flow run, waited for suspended.

    Raises ClusterStepFailed (its message: the step, the job's outcome, its last log lines) if the
    job did not complete or its declared outputs are missing or changed.
    """
    [job] = run_cluster_jobs([step], request_id=request_id, on_wait=on_wait)
    return job


def run_cluster_jobs(
    steps: Sequence[ClusterStep], *, request_id: int | None = None, on_wait: OnWait | None = None
) -> list[ClusterJob]:
    """The steps' jobs, in the order of `steps`, once every one has ended: one suspension for all.

    Every step's job is declared (or found again, on a re-run) before the flow run suspends; the
    reconciler resumes it once, when the last has ended. Then each is verified; if any failed,
    one ClusterStepFailed names each failed step (the others ran to their end all the same).
    `request_id` ties the waits to an AnalysisRequest (its cancellation then cancels the jobs).
    `on_wait`, if given, is called with the steps not yet ended just before suspending (not at all
    when every job had already ended, as on the re-run after the resume).
    """
    names = [step.name for step in steps]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"each step of a flow run needs its own name; given more than once: {', '.join(duplicates)}")
    if not steps:
        return []
    # One transaction for the whole fan-out: the reconciler sees all of its jobs declared or none,
    # so one tick submits those of one shape together (as one job array, above EMG_ARRAY_MIN_TASKS).
    with transaction.atomic():
        job_ids = [
            require_job(
                step.name,
                step.spec,
                inputs=[str(path) for path in step.inputs],
                policy=step.policy,
                request_id=request_id,
                outputs=list(step.outputs),
            )
            for step in steps
        ]
    if on_wait is not None:
        declared = ClusterJob.objects.in_bulk(job_ids)
        pending = {step.name: declared[job_id] for step, job_id in zip(steps, job_ids, strict=True)}
        pending = {name: job for name, job in pending.items() if not job.is_final}
        if pending:
            on_wait(pending)
    ended = {job.id: job for job in wait_for_jobs(sorted(set(job_ids)))}
    results = [ended[job_id] for job_id in job_ids]
    failures = [
        failure
        for step, job in zip(steps, results, strict=True)
        if (failure := verified_failure(step.name, job)) is not None
    ]
    if failures:
        raise ClusterStepFailed(failures, of=len(steps))
    # As recorded, manifests included: one read for the whole fan-out, not one per job.
    fresh = ClusterJob.objects.in_bulk(job_ids)
    return [fresh[job_id] for job_id in job_ids]


def verified_failure(step: str, job: ClusterJob) -> StepFailure | None:
    """What makes this ended job no result of `step`, or None: it COMPLETED and its declared
    outputs exist and hash to its manifest (recorded now, by the first flow to see it ended)."""
    if job.state != ClusterJobState.COMPLETED:
        log_tail = tail_log(job.log_path, LOG_TAIL_LINES) if job.log_path else ""
        return StepFailure(step, job, f"{step} failed: {job.outcome}", log_tail)
    try:
        record_manifest(job)
    except OutputsMissing as error:
        return StepFailure(step, job, f"{step}: {error}")
    problems = manifest_problems(job)
    if problems:
        return StepFailure(
            step, job, f"{step}: the outputs of cluster job #{job.id} changed after it ended: {'; '.join(problems)}"
        )
    return None
