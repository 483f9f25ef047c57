"""Turning an outbox event into exactly one Prefect flow run of its trigger's deployment.

Any trigger's (emg.triggers): the event names its trigger, its row and its run key, and carries
the run's parameters; the trigger says whether the event is still current and what to record
once the run is made. Runs are created as `run_deployment(..., timeout=0, idempotency_key=key)`
would: Scheduled for now, with the key, which makes Prefect answer a second create with the run
it already made. Not linked as a subflow (run_deployment links it only when called inside a flow
or task run, and we are called from a Celery task), and with no trace label (run_deployment adds
one only inside a flow run or with OpenTelemetry instrumentation, which is not installed).
"""

import logging
import os
import threading
import uuid

import httpx
from django.db import transaction
from django.utils import timezone
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey
from prefect.client.schemas.objects import FlowRun
from prefect.states import Scheduled

from emg import tended_runs, triggers
from emg.models import OutboxEvent

logger = logging.getLogger(__name__)


def idempotency_key(event: OutboxEvent) -> str:
    return triggers.run_idempotency_key(event.trigger, event.run_key)


def dispatch_event(event_id: uuid.UUID | str) -> uuid.UUID | None:
    """Create (or find) the flow run for an event and record it; safe to call any number of times."""
    event = OutboxEvent.objects.filter(id=event_id).first()
    if event is None:
        logger.warning("event %s does not exist (rolled back or deleted); nothing to dispatch", event_id)
        return None
    if event.dispatched_at is not None:
        return event.flow_run_id
    trigger = triggers.get(event.trigger)
    if trigger is None:
        # Left undispatched, for the sweep to publish again: a process started before the trigger
        # was declared (a rolling deploy) is not the last to see it.
        logger.error("event %s: no trigger %r is declared here (EMG_TRIGGER_MODULES)", event.id, event.trigger)
        OutboxEvent.objects.filter(id=event.id).update(last_error=f"unknown trigger {event.trigger!r}"[:2000])
        return None
    instance = trigger.load(event.object_id)
    if instance is None or not trigger.current(instance, event):
        logger.info(
            "event %s is superseded (%s %s: %s)",
            event.id,
            event.trigger,
            event.run_key,
            "its object was deleted" if instance is None else "no longer current",
        )
        # A consumer that died after making the run, whose run then superseded the event (it ended
        # the request) before this redelivery: the run exists, and is recorded as made.
        flow_run_id = existing_flow_run_id(event)
        with transaction.atomic():
            if flow_run_id is not None and instance is not None and trigger.on_dispatched is not None:
                trigger.on_dispatched(instance, event, flow_run_id)
            OutboxEvent.objects.filter(id=event.id).update(dispatched_at=timezone.now(), flow_run_id=flow_run_id)
        return None

    flow_run = prefect_connection.create_run(
        trigger.deployment,
        parameters=event.parameters,
        idempotency_key=idempotency_key(event),
        name=trigger.name_of_run(instance, event),
        tags=trigger.tags_of_run(instance, event),
    )
    with transaction.atomic():
        if trigger.on_dispatched is not None:
            trigger.on_dispatched(instance, event, flow_run.id)
        if trigger.recover:
            tended_runs.track(flow_run.id, f"trigger {trigger.name} (run key {event.run_key})")
        OutboxEvent.objects.filter(id=event.id).update(
            dispatched_at=timezone.now(), flow_run_id=flow_run.id, last_error=""
        )
    logger.info("%s %s -> flow run %s", event.trigger, event.run_key, flow_run.id)
    return flow_run.id


class PrefectConnection:
    """One Prefect client per process, and the deployment ids it has looked up, kept between events.

    `run_deployment` opens a client, looks the deployment up by name and makes a new HTTP
    connection for every run: about 15 runs/s from a dispatch worker, where one kept client with
    the id looked up once creates 42/s from one thread (bench/README.md). The client's connection
    pool (httpx) is shared by the threads of a process; a process forked from one that had a client
    (Celery's prefork pool) makes its own, and leaves the inherited sockets to its parent. A client
    whose connection broke is dropped, so the next call (the task's retry) starts afresh.
    """

    def __init__(self) -> None:
        self._forget_all()
        os.register_at_fork(after_in_child=self._forget_all)

    def _forget_all(self) -> None:
        # Also right after a fork: what the parent had is the parent's (closing its client here
        # would shut the parent's sockets), and a lock another thread held then is never released.
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._client: SyncPrefectClient | None = None
        self._deployment_ids: dict[str, uuid.UUID] = {}

    def client(self) -> SyncPrefectClient:
        with self._lock:
            if self._pid != os.getpid():  # a child made by other means than os.fork (which resets all)
                self._pid, self._client, self._deployment_ids = os.getpid(), None, {}
            if self._client is None:
                self._client = get_client(sync_client=True).__enter__()
                logger.info("process %s: new Prefect client for %s", os.getpid(), self._client.api_url)
            return self._client

    def drop_client(self, client: SyncPrefectClient) -> None:
        with self._lock:
            if self._client is client and self._pid == os.getpid():
                self._client = None
                try:
                    client.__exit__(None, None, None)
                except Exception:  # it is broken already: nothing more to release
                    pass

    def deployment_id(self, client: SyncPrefectClient, name: str) -> uuid.UUID:
        with self._lock:
            known = self._deployment_ids.get(name)
        if known is not None:
            return known
        found = client.read_deployment_by_name(name).id
        logger.info("process %s: deployment %s is %s", os.getpid(), name, found)
        with self._lock:
            self._deployment_ids[name] = found
        return found

    def forget_deployment(self, name: str, deployment_id: uuid.UUID) -> None:
        with self._lock:
            if self._deployment_ids.get(name) == deployment_id:
                del self._deployment_ids[name]

    def create_run(
        self, deployment_name: str, *, parameters: dict, idempotency_key: str, name: str, tags: list[str]
    ) -> FlowRun:
        """A flow run of the deployment, Scheduled for now; its id is looked up again once if Prefect
        no longer knows it (deleted and deployed again, e.g. by a redeploy: a new id, the same name)."""
        client = self.client()

        def create(deployment_id: uuid.UUID) -> FlowRun:
            return client.create_flow_run_from_deployment(
                deployment_id,
                parameters=parameters,
                state=Scheduled(scheduled_time=timezone.now()),
                idempotency_key=idempotency_key,
                name=name,
                tags=tags,
            )

        try:
            deployment_id = self.deployment_id(client, deployment_name)
            try:
                return create(deployment_id)
            except httpx.HTTPStatusError as error:
                if error.response.status_code != 404:
                    raise
            logger.info("deployment %s (%s) is gone from Prefect; looking it up again", deployment_name, deployment_id)
            self.forget_deployment(deployment_name, deployment_id)
            return create(self.deployment_id(client, deployment_name))
        except (httpx.TransportError, RuntimeError):
            # No answer (Prefect restarting, a connection reset) or a client closed under us: a
            # fresh client for the next call; the error goes to the caller, whose retry makes it.
            self.drop_client(client)
            raise

    def flow_run_ids_by_key(self, key: str) -> list[uuid.UUID]:
        client = self.client()
        try:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=[key])),
                limit=1,
            )
            return [run.id for run in runs]
        except (httpx.TransportError, RuntimeError):
            self.drop_client(client)
            raise


prefect_connection = PrefectConnection()


def flow_run_id_by_key(key: str) -> uuid.UUID | None:
    ids = prefect_connection.flow_run_ids_by_key(key)
    return ids[0] if ids else None


def existing_flow_run_id(event: OutboxEvent) -> uuid.UUID | None:
    return flow_run_id_by_key(idempotency_key(event))
