"""Every change of a ChildRun: declared by its parent, created in Prefect, ended, given up, waited for.

A parent flow run's children (flows.child_flows) are runs of other deployments, one per (parent
run, key). Like emg.jobs and emg.waits, each change here is a compare-and-set on the state as read
(`UPDATE ... WHERE id = ? AND state = <read>`) that appends its history entry in the same statement
and says whether it applied; the caller acts only if it did:

- a parent process creates the Prefect run only after its claim applied (DECLARED -> CREATING);
  a child given up before that is never created. Creation is idempotent in Prefect (the row's
  `idempotency_key`), so a later process of the same parent creating a CREATING child again finds
  the same run, and the first record of its id wins (CREATING -> RUNNING);
- the reconciler ends a child (RUNNING -> its final state) once Prefect reports it ended, and
  resumes the parent once every child it waits for has ended;
- a child is given up (cancel_requested_at) when its parent was cancelled or its request ended;
  the reconciler then cancels its run. A declared one is cancelled at once: it has no run.

`suspensions` and `released_at` are the parent's wait on the child (as JobWait's are on a job):
a round opened per suspension, for all the parent's children at once or for none, and released
by the tick that resumed the parent or by the parent finding its children ended. Nothing else
writes those columns (tests/test_transition_owners.py checks).
"""

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Literal
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from emg.history import AppendToHistory, HistoryEntry, apply_transition
from emg.history import entry as _entry
from emg.models import ChildRun, ChildRunState

logger = logging.getLogger(__name__)

State = ChildRunState
OPENED = "opened"
RELEASED = "released"
REOPENED = "reopened"
Releaser = Literal["tick", "flow"]


def idempotency_key(parent_flow_run_id: UUID, key: str) -> str:
    """Prefect's key of the child run: the namespace first, so two instances on one Prefect server
    never find each other's runs; then the parent run and the child's key within it."""
    return f"{settings.EMG_INSTANCE_NAMESPACE}:child:{parent_flow_run_id}:{key}"


def _as_read(child: ChildRun) -> QuerySet[ChildRun]:
    return ChildRun.objects.filter(id=child.id, state=child.state)


def _apply(rows: QuerySet[ChildRun], child: ChildRun, step: str, entry: HistoryEntry, **changes: Any) -> bool:
    return apply_transition(rows, f"child run #{child.id} ({child.key})", step, entry, logger, **changes)


@dataclasses.dataclass(frozen=True)
class ChildFlow:
    """One child a parent declares: a run of `deployment` with `parameters`, found again by `key`.

    `idempotency_key`, if given, is the Prefect key of a run something else may create too (the run
    a trigger starts for a row, say): the child is then that run, whichever of the two makes it first."""

    deployment: str
    parameters: dict
    key: str
    idempotency_key: str = ""


def declare(
    parent_flow_run_id: UUID,
    deployment: str,
    children: Sequence[tuple[str, dict]],
    request_id: int | None = None,
) -> list[ChildRun]:
    """The parent's children of one deployment, of these (key, parameters): see `declare_each`."""
    return declare_each(
        parent_flow_run_id, [ChildFlow(deployment, parameters, key) for key, parameters in children], request_id
    )


def declare_each(
    parent_flow_run_id: UUID, children: Sequence[ChildFlow], request_id: int | None = None
) -> list[ChildRun]:
    """The parent's children, in the order given: each one written the first time, found again (as
    it was first declared) every later time. Creating a row is no transition."""
    now = timezone.now()
    ChildRun.objects.bulk_create(
        [
            ChildRun(
                parent_flow_run_id=parent_flow_run_id,
                key=child.key,
                deployment=child.deployment,
                parameters=child.parameters,
                idempotency_key=child.idempotency_key or idempotency_key(parent_flow_run_id, child.key),
                request_id=request_id,
                history=[_entry(State.DECLARED, f"child {child.key} of {child.deployment}", now).to_json()],
            )
            for child in children
        ],
        ignore_conflicts=True,
    )
    keys = [child.key for child in children]
    found = {child.key: child for child in ChildRun.objects.filter(parent_flow_run_id=parent_flow_run_id, key__in=keys)}
    missing = [key for key in keys if key not in found]
    if missing:
        # ignore_conflicts hid why: another parent's child holds the Prefect key this one asked for.
        raise ValueError(
            f"children {', '.join(missing)} of flow run {parent_flow_run_id} could not be declared: "
            "their flow runs are another parent's children"
        )
    return [found[key] for key in keys]


def claim(child: ChildRun) -> bool:
    """A parent process takes the creation of this declared child's run; only then may it create it."""
    return _apply(
        _as_read(child).filter(state=State.DECLARED, cancel_requested_at__isnull=True),
        child,
        "claim",
        _entry(State.CREATING, "its parent creates its flow run"),
        state=State.CREATING,
        claimed_at=timezone.now(),
    )


def started(child: ChildRun, flow_run_id: UUID, by: str) -> bool:
    """The child's run exists: recorded once (CREATING -> RUNNING), by whoever found it first."""
    return _apply(
        ChildRun.objects.filter(id=child.id, state=State.CREATING, child_flow_run_id__isnull=True),
        child,
        "record its flow run",
        _entry(State.RUNNING, f"flow run {flow_run_id}, found by the {by}"),
        state=State.RUNNING,
        child_flow_run_id=flow_run_id,
    )


def end(child: ChildRun, state: str, outcome: str) -> bool:
    """Prefect reports the child's run ended (`state`: one of the final ChildRunStates)."""
    if state not in (State.COMPLETED, State.FAILED, State.CANCELLED, State.CRASHED):
        raise ValueError(f"{state!r} is not a final state of a child run")
    return _apply(
        _as_read(child).filter(state=State.RUNNING),
        child,
        "end",
        _entry(state, outcome),
        state=state,
        outcome=outcome[:2000],
        ended_at=timezone.now(),
    )


def give_up(child: ChildRun, why: str) -> bool:
    """No one waits for this child any more (its parent was cancelled, its request ended): marked
    for cancellation. A declared child has no run and never will: it is cancelled at once."""
    rows = _as_read(child).filter(
        cancel_requested_at__isnull=True, state__in=[State.DECLARED, State.CREATING, State.RUNNING]
    )
    now = timezone.now()
    if child.state == State.DECLARED:
        return _apply(
            rows,
            child,
            "give up",
            _entry(State.CANCELLED, f"given up before its flow run was created: {why}", now),
            state=State.CANCELLED,
            cancel_requested_at=now,
            ended_at=now,
            outcome=f"cancelled before it started: {why}"[:2000],
        )
    return _apply(rows, child, "give up", _entry("CANCEL REQUESTED", why, now), cancel_requested_at=now)


def cancel_uncreated(child: ChildRun, why: str) -> bool:
    """A given-up child whose claimed creation never reached Prefect (none has its key): cancelled.
    A creation that lands after this finds the row ended, and its creator cancels the run it made."""
    now = timezone.now()
    return _apply(
        _as_read(child).filter(state=State.CREATING, cancel_requested_at__isnull=False, child_flow_run_id__isnull=True),
        child,
        "cancel",
        _entry(State.CANCELLED, why, now),
        state=State.CANCELLED,
        ended_at=now,
        outcome=why[:2000],
    )


# --- the parent's wait on its children -------------------------------------------------------


def _release(rows: QuerySet[ChildRun], by: Releaser, why: str) -> int:
    entry = HistoryEntry(RELEASED, f"by the {by}: {why}", timezone.now())
    released: int = rows.filter(released_at__isnull=True).update(
        released_at=entry.at, history=AppendToHistory(entry), updated_at=entry.at
    )
    return released


def release(child_ids: list[int], by: Releaser, why: str) -> int:
    """Release the parent's open waits on these children; how many this call released."""
    return _release(ChildRun.objects.filter(id__in=child_ids), by, why)


def release_for_parent(parent_flow_run_id: UUID, keys: list[str], by: Releaser, why: str) -> int:
    return _release(ChildRun.objects.filter(parent_flow_run_id=parent_flow_run_id, key__in=keys), by, why)


def rounds_read(parent_flow_run_id: UUID, keys: list[str]) -> dict[int, int]:
    """The parent's waits on these children as they are now, each child's id to its round: what
    `open_round` is given, and guarded on."""
    rows = ChildRun.objects.filter(parent_flow_run_id=parent_flow_run_id, key__in=keys)
    return dict(rows.values_list("id", "suspensions"))


def open_round(read: dict[int, int]) -> int | None:
    """Open the waits read (`rounds_read`) for one more suspension, all or none: the round's number,
    or None if any was re-opened since it was read (by another process of the same parent)."""
    if not read:
        raise ValueError("no child to wait for: a parent waits only for children it declared")
    round_number = max(read.values()) + 1
    entry = HistoryEntry(REOPENED, f"round {round_number}", timezone.now())
    as_read = Q()
    for child_id, suspensions in read.items():
        as_read |= Q(id=child_id, suspensions=suspensions)
    with transaction.atomic():
        opened: int = ChildRun.objects.filter(as_read).update(
            suspensions=F("suspensions") + 1, released_at=None, history=AppendToHistory(entry), updated_at=entry.at
        )
        if opened != len(read):
            transaction.set_rollback(True)
            return None
    return round_number
