"""A kit for testing a flow end to end: save the row its trigger waits for, and watch the run it started.

On the session's stack (the `stack` fixture: outbox, Redis, Celery, Prefect, a runner serving every
trigger's deployment, the reconciler) and real Slurm, or on its twin with local processes for
cluster jobs (the `local_stack` fixture: no Slurm), a new flow's test is a few lines:

    def test_my_flow(stack, ena_server):
        run = run_started_by(AnalysisRequest.objects.create(study=study), "analysis-request")
        states = run.wait_for_state("Completed", timeout=240)
        assert states.count("Suspended") == 3  # one per cluster step
        jobs = run.jobs()  # step name -> ClusterJob, as the flow declared them
        assert {job.state for job in jobs.values()} == {"COMPLETED"}
        assert_each_job_ran_once_in_slurm(jobs.values())  # jobs submitted on their own, not an array's tasks

Everything waits on a condition with a deadline; nothing sleeps and hopes.
"""

import dataclasses
from uuid import UUID

from django.db import models

from devstack.processes import wait_until
from emg.models import ChildRun, ClusterJob, JobWait, OutboxEvent
from tests.e2e.requests import assert_each_job_ran_once_in_slurm, state_names

__all__ = ["FlowRunWatch", "assert_each_job_ran_once_in_slurm", "run_started_by"]


@dataclasses.dataclass(frozen=True)
class FlowRunWatch:
    """One flow run, seen through Prefect's states and our rows."""

    flow_run_id: UUID

    def states(self) -> list[str]:
        """The names of the run's states, oldest first (Scheduled, Running, Suspended, ...)."""
        return state_names(self.flow_run_id)

    def wait_for_state(self, name: str, timeout: float = 240) -> list[str]:
        """Wait until the run's latest state is `name`; its states' names then."""
        return wait_until(
            lambda: (names := self.states()) and names[-1] == name and names,
            timeout=timeout,
            interval=0.5,
            message=f"flow run {self.flow_run_id} is {name}",
        )

    def jobs(self) -> dict[str, ClusterJob]:
        """The cluster jobs the run waits or waited for, by the step that declared each."""
        waits = JobWait.objects.filter(flow_run_id=self.flow_run_id).select_related("job")
        return {wait.step: wait.job for wait in waits}

    def children(self) -> dict[str, ChildRun]:
        """The child flows the run started, by their keys."""
        return {child.key: child for child in ChildRun.objects.filter(parent_flow_run_id=self.flow_run_id)}


def run_started_by(row: models.Model, trigger: str, timeout: float = 60) -> FlowRunWatch:
    """The flow run that the trigger named `trigger` started for `row`, once its event is dispatched."""
    flow_run_id = wait_until(
        lambda: (
            OutboxEvent.objects.of(row)
            .filter(trigger=trigger, flow_run_id__isnull=False)
            .values_list("flow_run_id", flat=True)
            .first()
        ),
        timeout=timeout,
        interval=0.2,
        message=f"{row._meta.label} #{row.pk} started a run of trigger {trigger}",
    )
    return FlowRunWatch(flow_run_id)
