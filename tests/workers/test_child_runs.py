"""The reconciler tends child flow runs (flows.child_flows): one batched Prefect read a tick for every
live child and its parent; a child whose run ended is ended, and its suspended parent resumed once
the last has; a cancelled parent's (or ended request's) children are given up and their runs cancelled.

Real flow runs on the session's Prefect server, moved through the states a waiting parent and its
children go through (tests/workers/flow_runs.py); the test drives the ticks.
"""

from uuid import UUID

import pytest
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelling, Completed, Failed

from emg import children
from emg.models import ChildRun, ChildRunState
from tests.workers.flow_runs import new_flow_run, request_with_flow_run, set_running, state_type, suspend

pytestmark = pytest.mark.django_db(transaction=True)

DEPLOYMENT = "emg-test-child/served"


def started_children(prefect, parent: UUID, count: int, request_id: int | None = None) -> list[ChildRun]:
    """Children declared, their runs made and recorded, as the parent's process does."""
    rows = children.declare(parent, DEPLOYMENT, [(f"c{index}", {}) for index in range(count)], request_id)
    for child in rows:
        assert children.claim(child)
        child.refresh_from_db()
        assert children.started(child, new_flow_run(prefect), "parent")
        child.refresh_from_db()
    return rows


def suspended_parent(prefect, rows: list[ChildRun], parent: UUID) -> None:
    round_number = children.open_round(children.rounds_read(parent, [child.key for child in rows]))
    suspend(prefect, parent, key=f"children-wait-{round_number}")


def counting_reads(prefect) -> list[int]:
    """How many runs each read_flow_runs call of this client asked for, from now on."""
    calls: list[int] = []
    read = prefect.read_flow_runs

    def counted(*args, **kwargs):
        calls.append(len(kwargs["flow_run_filter"].id.any_) if kwargs.get("flow_run_filter") else 0)
        return read(*args, **kwargs)

    prefect.read_flow_runs = counted
    return calls


def test_the_parent_is_resumed_once_in_the_tick_that_sees_its_last_child_end_from_one_read_of_them_all(
    make_reconciler, prefect
):
    parent = new_flow_run(prefect)
    set_running(prefect, parent)
    rows = started_children(prefect, parent, 3)
    suspended_parent(prefect, rows, parent)
    for child in rows:
        set_running(prefect, child.child_flow_run_id)
    prefect.set_flow_run_state(rows[0].child_flow_run_id, Completed(), force=True)
    prefect.set_flow_run_state(rows[1].child_flow_run_id, Failed(message="boom"), force=True)
    reconciler = make_reconciler()
    reads = counting_reads(prefect)

    report = reconciler.tick()
    assert report.errors == []
    assert sorted(report.children_ended) == sorted([rows[0].id, rows[1].id])
    assert parent not in report.resumed and state_type(prefect, parent) == StateType.PAUSED
    # The children step reads every live child and its parent in one call.
    assert reads[0] == 4

    prefect.set_flow_run_state(rows[2].child_flow_run_id, Completed(), force=True)
    report = reconciler.tick()
    assert report.children_ended == [rows[2].id] and report.resumed == [parent]
    assert state_type(prefect, parent) != StateType.PAUSED
    ended = {child.key: child for child in ChildRun.objects.filter(parent_flow_run_id=parent)}
    assert [ended[f"c{index}"].state for index in range(3)] == ["COMPLETED", "FAILED", "COMPLETED"]
    assert ended["c1"].outcome == "Failed: boom"
    assert all(child.released_at is not None for child in ended.values())
    assert reconciler.tick().resumed == []  # resumed once


def test_cancelling_the_parent_gives_up_every_child_and_cancels_its_run_with_or_without_a_process(
    make_reconciler, prefect
):
    parent = new_flow_run(prefect)
    set_running(prefect, parent)
    [suspended, running] = started_children(prefect, parent, 2)
    [declared] = children.declare(parent, DEPLOYMENT, [("c-declared", {})])
    suspended_parent(prefect, [suspended, running, declared], parent)
    suspend(prefect, suspended.child_flow_run_id, key="jobs-wait-1")
    set_running(prefect, running.child_flow_run_id)
    prefect.set_flow_run_state(parent, Cancelling(message="cancelled in the UI"), force=True)
    reconciler = make_reconciler()

    report = reconciler.tick()
    assert report.errors == []
    assert sorted(report.children_given_up) == sorted([suspended.id, running.id, declared.id])
    # No process: Cancelled at once. A process: Cancelling, for its runner to kill it.
    assert state_type(prefect, suspended.child_flow_run_id) == StateType.CANCELLED
    assert state_type(prefect, running.child_flow_run_id) == StateType.CANCELLING
    declared.refresh_from_db()
    assert declared.state == ChildRunState.CANCELLED

    report = reconciler.tick()
    assert report.children_ended == [suspended.id]
    assert report.children_given_up == []  # once
    # Still Cancelling until its runner has stopped it: not ended, not forced while its process may live.
    assert state_type(prefect, running.child_flow_run_id) == StateType.CANCELLING
    assert ChildRun.objects.get(id=running.id).state == ChildRunState.RUNNING


def test_cancelling_the_request_of_the_parent_gives_up_its_children(make_reconciler, prefect):
    request = request_with_flow_run(prefect, "PRJEB40001")
    rows = started_children(prefect, request.flow_run_id, 2, request_id=request.id)
    suspended_parent(prefect, rows, request.flow_run_id)
    for child in rows:
        suspend(prefect, child.child_flow_run_id, key="jobs-wait-1")
    assert request.request_cancel()
    reconciler = make_reconciler()

    report = reconciler.tick()
    assert report.cancelled == [request.id]
    assert sorted(report.children_given_up) == sorted(child.id for child in rows)
    assert {state_type(prefect, child.child_flow_run_id) for child in rows} == {StateType.CANCELLED}
    reconciler.tick()
    assert {child.state for child in ChildRun.objects.filter(request=request)} == {ChildRunState.CANCELLED}
