"""A dispatch process keeps one Prefect client and each deployment's id between events, finds a
deployment that was deleted and deployed again under its name, and gets a client of its own
after a fork. On the session's real Prefect server and its real Celery dispatch worker.
"""

import json
import multiprocessing
import uuid
from collections import Counter

import pytest
from prefect.client.orchestration import get_client

from devstack.processes import wait_until
from emg.models import AnalysisRequest
from flows.deployments import ANALYSIS_DEPLOYMENT
from tests.e2e.requests import new_request
from tests.workers.flow_runs import awaiting_flow
from workers.dispatch import PrefectConnection


def dispatch_log(log_text: str) -> list[tuple[str, str]]:
    """(process, message) of each line workers.dispatch logged."""
    records = []
    for line in log_text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("logger") == "workers.dispatch":
            records.append((record["process"], record["message"]))
    return records


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_dispatch_worker_process_makes_one_client_and_looks_each_deployment_up_once_for_many_events(stack):
    requests = [new_request(f"PRJEB3100{n}") for n in range(8)]
    wait_until(
        lambda: not AnalysisRequest.objects.filter(id__in=[r.id for r in requests], flow_run_id__isnull=True).exists(),
        timeout=120,
        message="every request has its flow run",
    )

    records = dispatch_log(stack.worker.log_path.read_text(errors="replace"))
    dispatched = Counter(process for process, message in records if " -> flow run " in message)
    clients = Counter(process for process, message in records if "new Prefect client" in message)
    # Per deployment: the session's worker also dispatches other triggers' events (tests/test_triggers.py).
    lookups = Counter(
        (process, message.split(": deployment ", 1)[1].split(" is ", 1)[0])
        for process, message in records
        if ": deployment " in message
    )
    ours = {
        f"analysis-request {r.id}:generation:1 -> flow run {r.flow_run_id}"
        for r in AnalysisRequest.objects.filter(id__in=[r.id for r in requests])
    }
    assert ours <= {message for _, message in records}
    # Each process of the worker dispatched several events with the one client it made first.
    assert max(dispatched.values()) >= 2, dispatched
    assert set(clients) >= set(dispatched) and max(clients.values()) == 1, clients
    assert max(lookups.values()) == 1 and {name for _, name in lookups} >= {ANALYSIS_DEPLOYMENT}, lookups


def deploy(client, name: str) -> uuid.UUID:
    return client.create_deployment(flow_id=client.create_flow(awaiting_flow), name=name)


def create(connection: PrefectConnection, deployment: str, key: str):
    return connection.create_run(deployment, parameters={}, idempotency_key=key, name=key, tags=["emg-test"])


def test_a_deployment_deleted_and_deployed_again_is_found_under_its_name_by_the_same_client(prefect_api_url):
    name = f"recreated-{uuid.uuid4().hex[:8]}"
    full_name = f"{awaiting_flow.name}/{name}"
    connection = PrefectConnection()
    with get_client(sync_client=True) as prefect:
        first_id = deploy(prefect, name)
        first = create(connection, full_name, f"{name}-a")
        client = connection.client()
        assert first.deployment_id == first_id
        # The same key: Prefect answers with the run it already made, as run_deployment's did.
        assert create(connection, full_name, f"{name}-a").id == first.id

        prefect.delete_deployment(first_id)
        second_id = deploy(prefect, name)
        assert second_id != first_id
        second = create(connection, full_name, f"{name}-b")

        assert second.deployment_id == second_id
        assert prefect.read_flow_run(second.id).deployment_id == second_id
        assert connection.client() is client  # a 404 for the id is no reason to drop the client
        prefect.delete_deployment(second_id)


def create_in_child(connection: PrefectConnection, deployment: str, key: str, answers) -> None:
    inherited = connection._client  # what the fork left: reset, the parent's is the parent's
    answers.put((inherited is None, str(create(connection, deployment, key).id)))


def test_a_forked_process_makes_a_client_of_its_own_and_the_parents_keeps_working(prefect_api_url):
    name = f"forked-{uuid.uuid4().hex[:8]}"
    full_name = f"{awaiting_flow.name}/{name}"
    connection = PrefectConnection()
    with get_client(sync_client=True) as prefect:
        deployment_id = deploy(prefect, name)
        parent_run = create(connection, full_name, f"{name}-parent")
        client = connection.client()

        context = multiprocessing.get_context("fork")
        answers = context.Queue()
        child = context.Process(target=create_in_child, args=(connection, full_name, f"{name}-child", answers))
        child.start()
        child_had_no_client, child_run_id = answers.get(timeout=60)
        child.join(timeout=60)

        assert child.exitcode == 0 and child_had_no_client
        assert prefect.read_flow_run(uuid.UUID(child_run_id)).deployment_id == deployment_id
        # The parent's connection was not shut by the child: the same client creates the next run.
        assert connection.client() is client
        assert create(connection, full_name, f"{name}-parent-2").id != parent_run.id
        prefect.delete_deployment(deployment_id)
