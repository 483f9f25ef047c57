"""Flow runs without an AnalysisRequest (a trigger's run of another flow, a child run) are recovered as a
request's run is: re-run in place when they crash or fall silent, a bounded number of times each,
counted by a compare-and-set on their TendedRun row; no longer tended once they end (a Failed run
ended by its flow's own verdict).

Real flow runs on the session's Prefect server, moved through the states a flow goes through
(tests/workers/flow_runs.py); the test drives the ticks.
"""

from datetime import timedelta
from uuid import UUID

import pytest
from django.utils import timezone
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelled, Completed, Crashed, Failed

from devstack.processes import wait_until
from emg import children, leases, tended_runs
from emg.models import ChildRun, ChildRunState, TendedRun
from tests.workers.flow_runs import new_flow_run, request_with_flow_run, set_running, state_type, suspend

pytestmark = pytest.mark.django_db(transaction=True)

DEPLOYMENT = "emg-test-child/served"


def tended_run(prefect, started_by: str = "trigger study-created-qc (run key 1)") -> UUID:
    flow_run_id = new_flow_run(prefect)
    tended_runs.track(flow_run_id, started_by)
    set_running(prefect, flow_run_id)
    return flow_run_id


def row(flow_run_id: UUID) -> TendedRun:
    return TendedRun.objects.get(flow_run_id=flow_run_id)


def test_a_crashed_run_without_a_request_is_rerun_in_place_up_to_the_limit_then_given_up(make_reconciler, prefect):
    flow_run_id = tended_run(prefect)
    reconciler = make_reconciler(max_flow_reruns=2)
    for rerun in (1, 2):
        prefect.set_flow_run_state(flow_run_id, Crashed(message="runner killed"), force=True)
        report = reconciler.tick()
        assert report.errors == [] and report.rerun == [flow_run_id]
        assert state_type(prefect, flow_run_id) == StateType.SCHEDULED
        assert row(flow_run_id).reruns == rerun
        # Scheduled, waiting for its runner: the next tick leaves it alone.
        assert reconciler.tick().rerun == []
        set_running(prefect, flow_run_id)

    prefect.set_flow_run_state(flow_run_id, Crashed(message="runner killed again"), force=True)
    report = reconciler.tick()
    assert report.rerun == []
    given_up = row(flow_run_id)
    assert given_up.ended_at is not None and given_up.reruns == 2
    assert given_up.outcome.startswith("given up: flow run crashed and was re-run 2 times already")
    assert state_type(prefect, flow_run_id) == StateType.CRASHED
    assert reconciler.tick().rerun == []  # no longer tended
    assert [entry["state"] for entry in given_up.history] == ["RUNNING", "RUNNING", "ENDED"]


def test_two_ticks_that_saw_the_same_crash_rerun_it_once():
    TendedRun.objects.create(flow_run_id=UUID(int=7), started_by="trigger t (run key 1)")
    first, second = row(UUID(int=7)), row(UUID(int=7))
    assert tended_runs.count_rerun(first, "flow run crashed")
    assert not tended_runs.count_rerun(second, "flow run crashed")
    assert row(UUID(int=7)).reruns == 1


def test_a_run_that_completed_failed_or_was_cancelled_is_no_longer_tended_and_a_suspended_one_still_is(
    make_reconciler, prefect
):
    completed, failed, cancelled, suspended = (tended_run(prefect) for _ in range(4))
    prefect.set_flow_run_state(completed, Completed(), force=True)
    prefect.set_flow_run_state(failed, Failed(message="no reads in any run"), force=True)
    prefect.set_flow_run_state(cancelled, Cancelled(), force=True)
    suspend(prefect, suspended, key="waiting-on-its-jobs")

    report = make_reconciler().tick()
    assert report.errors == [] and report.tended_ended == 3 and report.rerun == []
    assert [row(run).outcome for run in (completed, failed, cancelled)] == [
        "Completed",
        "Failed: no reads in any run",
        "Cancelled",
    ]
    assert state_type(prefect, failed) == StateType.FAILED  # the flow's verdict: not run again
    assert row(suspended).ended_at is None


def test_a_silent_running_run_without_a_request_is_rerun_unless_its_runner_still_holds_its_process(
    make_reconciler, prefect
):
    silent, leased = tended_run(prefect), tended_run(prefect)
    leases.renew("runner-host", {leased: 4242})
    zombie_after = timedelta(seconds=2)
    wait_until(
        lambda: all(
            timezone.now() - prefect.read_flow_run(run).state.timestamp > zombie_after for run in (silent, leased)
        ),
        timeout=30,
        interval=0.2,
        message="both runs have been Running, without a heartbeat, for longer than the zombie threshold",
    )
    leases.renew("runner-host", {leased: 4242})  # its runner vouches for it: renewed just now

    report = make_reconciler(zombie_after=zombie_after).tick()
    assert report.errors == []
    assert report.rerun == [silent] and report.leased == [leased]
    assert state_type(prefect, silent) == StateType.SCHEDULED and row(silent).reruns == 1
    assert state_type(prefect, leased) == StateType.RUNNING and row(leased).reruns == 0


def started_child(prefect, parent: UUID, key: str) -> ChildRun:
    """A child declared, its run made and recorded, as the parent's process does (flows.child_flows.start)."""
    [child] = children.declare(parent, DEPLOYMENT, [(key, {})])
    assert children.claim(child)
    child.refresh_from_db()
    flow_run_id = new_flow_run(prefect)
    assert children.started(child, flow_run_id, "parent")
    tended_runs.track(flow_run_id, f"child {key} of flow run {parent}")
    set_running(prefect, flow_run_id)
    child.refresh_from_db()
    return child


def test_a_crashed_child_is_rerun_and_its_parent_waits_for_its_last_run(make_reconciler, prefect):
    parent = new_flow_run(prefect)
    set_running(prefect, parent)
    child = started_child(prefect, parent, "qc")
    round_number = children.open_round(children.rounds_read(parent, ["qc"]))
    suspend(prefect, parent, key=f"children-wait-{round_number}")
    reconciler = make_reconciler(max_flow_reruns=1)

    prefect.set_flow_run_state(child.child_flow_run_id, Crashed(message="runner killed"), force=True)
    report = reconciler.tick()
    assert report.errors == [] and report.rerun == [child.child_flow_run_id] and report.children_ended == []
    assert ChildRun.objects.get(id=child.id).state == ChildRunState.RUNNING
    assert state_type(prefect, parent) == StateType.PAUSED

    # Its re-run crashes too, with no re-run left: given up, and then the child ends with it.
    set_running(prefect, child.child_flow_run_id)
    prefect.set_flow_run_state(child.child_flow_run_id, Crashed(message="runner killed again"), force=True)
    ended = wait_until(
        lambda: (report := reconciler.tick()).children_ended and report,
        timeout=30,
        interval=0,
        message="the child ends once its run is no longer re-run",
    )
    assert ended.children_ended == [child.id] and ended.resumed == [parent]
    assert ChildRun.objects.get(id=child.id).state == ChildRunState.CRASHED
    assert row(child.child_flow_run_id).outcome.startswith("given up: flow run crashed and was re-run 1 times")


def test_a_crashed_child_its_parent_gave_up_on_is_not_rerun(make_reconciler, prefect):
    parent = new_flow_run(prefect)
    set_running(prefect, parent)
    child = started_child(prefect, parent, "qc")
    prefect.set_flow_run_state(child.child_flow_run_id, Crashed(), force=True)
    prefect.set_flow_run_state(parent, Cancelled(message="cancelled in the UI"), force=True)

    report = make_reconciler().tick()
    assert report.errors == [] and report.rerun == []
    assert report.children_given_up == [child.id]
    assert row(child.child_flow_run_id).outcome == "given up: its parent no longer waits for it"
    assert state_type(prefect, child.child_flow_run_id) == StateType.CRASHED


def test_a_requests_run_adopted_as_a_child_is_rerun_by_its_request_and_tended_until_the_request_ends(
    make_reconciler, prefect
):
    request = request_with_flow_run(prefect, "PRJEB40001")
    tended_runs.track(request.flow_run_id, "child analysis of flow run x")
    prefect.set_flow_run_state(request.flow_run_id, Crashed(), force=True)
    reconciler = make_reconciler()

    report = reconciler.tick()
    assert report.rerun == [request.flow_run_id]  # once: by the request
    request.refresh_from_db()
    assert request.flow_reruns == 1 and row(request.flow_run_id).reruns == 0
    assert row(request.flow_run_id).ended_at is None

    type(request).objects.filter(id=request.id).update(status="COMPLETED", finished_at=timezone.now())
    assert reconciler.tick().tended_ended == 1
    assert row(request.flow_run_id).outcome == "its request ended COMPLETED"
