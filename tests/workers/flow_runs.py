"""Flow runs whose states the test sets, standing in for flows that wait for cluster jobs.

The reconciler only sees a flow run through the Prefect API (its state) and our database (its
JobWait rows); these runs are real runs on the session's Prefect server, moved through the
states a waiting flow goes through, without a process behind them.
"""

from uuid import UUID

from django.db import transaction
from django.utils import timezone
from prefect import flow
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import StateType
from prefect.states import Running, Suspended

from emg.models import AnalysisRequest, ClusterJob, JobWait, OutboxEvent, Study


@flow(name="emg-test-awaiting-flow")
def awaiting_flow() -> None:
    """Never run: it only names the flow runs below."""


def new_flow_run(prefect: SyncPrefectClient) -> UUID:
    """A run of a deployment no runner serves: only a deployment's runs can be resumed after suspending."""
    deployment_id = prefect.create_deployment(flow_id=prefect.create_flow(awaiting_flow), name="unserved")
    return prefect.create_flow_run_from_deployment(deployment_id).id


def set_running(prefect: SyncPrefectClient, flow_run_id: UUID) -> None:
    prefect.set_flow_run_state(flow_run_id, Running(), force=True)


def suspend(prefect: SyncPrefectClient, flow_run_id: UUID, key: str) -> None:
    """What `suspend_flow_run` in a flow does to its run (its process then exits)."""
    prefect.set_flow_run_state(flow_run_id, Suspended(timeout_seconds=3600, pause_key=key), force=True)


def state_type(prefect: SyncPrefectClient, flow_run_id: UUID) -> StateType:
    return prefect.read_flow_run(flow_run_id).state.type


def request_with_flow_run(prefect: SyncPrefectClient, accession: str) -> AnalysisRequest:
    """A request whose event is already dispatched to a flow run of ours: no stack starts a real one for it."""
    flow_run_id = new_flow_run(prefect)
    with transaction.atomic():
        study, _ = Study.objects.get_or_create(accession=accession)
        request = AnalysisRequest.objects.create(study=study)
        AnalysisRequest.objects.filter(id=request.id).update(
            flow_run_id=flow_run_id, status=AnalysisRequest.Status.WAITING
        )
        OutboxEvent.objects.of(request).update(dispatched_at=timezone.now())
    request.refresh_from_db()
    set_running(prefect, flow_run_id)
    return request


def await_job(
    flow_run_id: UUID, job: ClusterJob, request: AnalysisRequest | None = None, step: str = "step"
) -> JobWait:
    return JobWait.objects.create(flow_run_id=flow_run_id, step=step, job=job, request=request)
