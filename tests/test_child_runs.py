"""A ChildRun changes only by compare-and-set (emg.children), each change writing its history entry:
a child is declared once per (parent run, key), its run created only by the process whose claim
applied, recorded once, ended once, and given up once; the parent's wait on its children opens a
round for all of them or for none. Real PostgreSQL."""

import uuid

import pytest

from emg import children
from emg.models import ChildRun, ChildRunState

pytestmark = pytest.mark.django_db(transaction=True)

State = ChildRunState
DEPLOYMENT = "emg-test-child/served"


def declare(parent: uuid.UUID, count: int = 2) -> list[ChildRun]:
    return children.declare(parent, DEPLOYMENT, [(f"c{index}", {"index": index}) for index in range(count)])


def states(child: ChildRun) -> list[str]:
    return [entry["state"] for entry in ChildRun.objects.get(id=child.id).history]


def test_declaring_again_finds_the_children_as_first_declared_in_the_order_asked(settings):
    parent = uuid.uuid4()
    first = declare(parent)
    again = children.declare(parent, DEPLOYMENT, [("c1", {"index": 99}), ("c0", {"index": 98})])
    assert [child.id for child in again] == [first[1].id, first[0].id]
    assert [child.parameters for child in again] == [{"index": 1}, {"index": 0}]
    assert ChildRun.objects.filter(parent_flow_run_id=parent).count() == 2
    assert first[0].idempotency_key == f"{settings.EMG_INSTANCE_NAMESPACE}:child:{parent}:c0"
    assert states(first[0]) == [State.DECLARED]


def test_of_two_claims_from_one_read_one_applies_and_the_run_is_recorded_once():
    [child, _] = declare(uuid.uuid4())
    stale = ChildRun.objects.get(id=child.id)
    assert children.claim(child)
    assert not children.claim(stale)  # another process of the parent, from the same read
    run_id, other = uuid.uuid4(), uuid.uuid4()
    assert children.started(child, run_id, "parent")
    assert not children.started(child, other, "parent")
    child.refresh_from_db()
    assert (child.state, child.child_flow_run_id) == (State.RUNNING, run_id)
    assert states(child) == [State.DECLARED, State.CREATING, State.RUNNING]


def test_a_child_ends_once_and_only_from_running():
    [child, declared] = declare(uuid.uuid4())
    assert not children.end(declared, State.COMPLETED, "Completed")
    children.claim(child)
    child.refresh_from_db()
    assert not children.end(child, State.COMPLETED, "Completed")  # no run recorded yet
    children.started(child, uuid.uuid4(), "parent")
    child.refresh_from_db()
    stale = ChildRun.objects.get(id=child.id)
    assert children.end(child, State.FAILED, "Failed: boom")
    assert not children.end(stale, State.COMPLETED, "Completed")
    child.refresh_from_db()
    assert (child.state, child.outcome) == (State.FAILED, "Failed: boom") and child.ended_at is not None
    with pytest.raises(ValueError, match="not a final state"):
        children.end(child, State.RUNNING, "")


def test_a_declared_child_given_up_is_cancelled_at_once_and_can_no_longer_be_claimed():
    [child, _] = declare(uuid.uuid4())
    stale = ChildRun.objects.get(id=child.id)
    assert children.give_up(child, "its parent flow run was cancelled")
    assert not children.give_up(stale, "again")
    assert not children.claim(stale)  # its creation is never taken: no run is made for it
    child.refresh_from_db()
    assert child.state == State.CANCELLED and child.cancel_requested_at is not None
    assert states(child) == [State.DECLARED, State.CANCELLED]


def test_a_running_child_given_up_stays_running_until_its_run_has_ended():
    [child, _] = declare(uuid.uuid4())
    children.claim(child)
    child.refresh_from_db()
    children.started(child, uuid.uuid4(), "parent")
    child.refresh_from_db()
    assert children.give_up(child, "its request ended")
    child.refresh_from_db()
    assert child.state == State.RUNNING and child.cancel_requested_at is not None
    assert children.end(child, State.CANCELLED, "Cancelled")
    assert states(child) == [State.DECLARED, State.CREATING, State.RUNNING, "CANCEL REQUESTED", State.CANCELLED]


def test_a_given_up_creation_that_never_reached_prefect_is_cancelled_and_a_late_record_is_refused():
    [child, _] = declare(uuid.uuid4())
    children.claim(child)
    child.refresh_from_db()
    assert not children.cancel_uncreated(child, "not given up yet")
    children.give_up(child, "its parent flow run was cancelled")
    child.refresh_from_db()
    assert children.cancel_uncreated(child, "given up before its flow run was created")
    assert not children.started(child, uuid.uuid4(), "parent")  # its creator then cancels what it made
    child.refresh_from_db()
    assert child.state == State.CANCELLED and child.child_flow_run_id is None


def test_a_round_opens_for_all_of_a_parents_children_or_for_none():
    parent = uuid.uuid4()
    rows = declare(parent, count=3)
    keys = [child.key for child in rows]
    read = children.rounds_read(parent, keys)
    assert children.open_round(read) == 1
    assert children.open_round(read) is None  # another process of the parent opened it since that read
    assert children.open_round(children.rounds_read(parent, keys)) == 2
    assert children.release_for_parent(parent, keys, "flow", "ended") == 3
    assert children.release_for_parent(parent, keys, "tick", "again") == 0
    assert states(rows[0]) == [State.DECLARED, "reopened", "reopened", "released"]
    with pytest.raises(ValueError, match="no child to wait for"):
        children.open_round({})
