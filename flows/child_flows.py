"""Child flows for flow authors: start runs of another deployment and wait for them holding nothing.

    results = run_child_flows("count-sample/served", [{"sample": name} for name in samples])

A subflow cannot suspend (it runs inside its parent's process), so each child that may wait is a
run of its own deployment, created with `run_deployment(..., as_subflow=False, timeout=0)` and a
Prefect idempotency key derived from the instance, the parent run and the child's key: however
many times the parent runs from the top (every resume; a re-run after a crash), it finds the same
children (emg.children: one ChildRun row per parent run and key) and never starts them twice.
The parent then suspends once for all of them; the reconciler reads every awaited child's state
in one batched Prefect call per tick and resumes the parent when the last has ended. Cancelling
the parent (in Prefect, or the request it runs for) cancels the children, and with them their
Slurm jobs. See docs/writing-flows.md.
"""

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from typing import Any, cast
from uuid import UUID

from django.conf import settings
from django.db import close_old_connections, models, transaction
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.flow_runs import suspend_flow_run
from prefect.states import Cancelled

from emg import children, tended_runs, triggers
from emg.children import ChildFlow
from emg.models import ChildRun, ChildRunState
from flows.cluster_jobs import current_flow_run_id

logger = logging.getLogger(__name__)

# ChildRun.key's column width.
MAX_KEY = 200


@dataclasses.dataclass(frozen=True)
class ChildResult:
    """How one child ended: its key, its flow run, its final state (COMPLETED, FAILED, CANCELLED or
    CRASHED) with Prefect's message, and its return value if it persisted one (else None)."""

    key: str
    flow_run_id: UUID | None
    state: str
    message: str = ""
    result: Any = None

    @property
    def completed(self) -> bool:
        return self.state == ChildRunState.COMPLETED

    def __str__(self) -> str:
        run = f"flow run {self.flow_run_id}" if self.flow_run_id else "no flow run"
        return f"child {self.key} ({run}) ended {self.state}" + (f": {self.message}" if self.message else "")


class ChildFlowFailed(Exception):
    """One or more children did not complete; raised once every child has ended."""

    def __init__(self, failures: Sequence[ChildResult], results: Sequence[ChildResult]):
        self.failures = list(failures)
        self.results = list(results)
        names = ", ".join(failure.key for failure in self.failures)
        super().__init__(
            f"{len(self.failures)} of {len(self.results)} child flows did not complete ({names}):\n"
            + "\n".join(str(failure) for failure in self.failures)
        )

    @property
    def keys(self) -> list[str]:
        return [failure.key for failure in self.failures]


def run_child_flows(
    deployment: str,
    parameters: Sequence[dict],
    *,
    keys: Sequence[str] | None = None,
    request_id: int | None = None,
) -> list[ChildResult]:
    """Run `deployment` ("<flow name>/<deployment name>") once per parameters, as runs of their own,
    and return how each ended, in the order given, once all have: one suspension for all of them.

    `keys` name the children within this flow run (default: "<deployment>[<index>]"): a run from
    the top finds each child again by its key, whatever its parameters say now. Raises
    ChildFlowFailed, naming each child that did not complete, once every child has ended.
    `request_id` ties the children to an AnalysisRequest: cancelling it cancels them.
    """
    if keys is None:
        keys = [f"{deployment}[{index}]" for index in range(len(parameters))]
    keys = list(keys)
    if len(keys) != len(parameters):
        raise ValueError(f"{len(parameters)} children's parameters but {len(keys)} keys")
    return run_children(
        [ChildFlow(deployment, dict(given), key) for key, given in zip(keys, parameters, strict=True)],
        request_id=request_id,
    )


def run_children(declared: Sequence[ChildFlow], *, request_id: int | None = None) -> list[ChildResult]:
    """`run_child_flows` for children of several deployments (`ChildFlow(deployment, parameters, key)`),
    all waited for with one suspension; results in the order given."""
    keys = [child.key for child in declared]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"each child of a flow run needs its own key; given more than once: {', '.join(duplicates)}")
    too_long = [key for key in keys if not key or len(key) > MAX_KEY]
    if too_long:
        raise ValueError(f"a child's key must be 1 to {MAX_KEY} characters, not {too_long[0]!r}")
    for wanted in declared:
        if "/" not in wanted.deployment:
            raise ValueError(f"deployment must be '<flow name>/<deployment name>', not {wanted.deployment!r}")
    if not keys:
        return []
    parent = current_flow_run_id()
    for row in children.declare_each(parent, declared, request_id):
        start(row)
    return wait_for_children(parent, keys)


def trigger_run(trigger_name: str, row: models.Model) -> ChildFlow:
    """The run the trigger `trigger_name` starts for `row`, as a child: the same deployment,
    parameters and Prefect idempotency key as the trigger's own, so the parent and the trigger's
    dispatch, whichever comes first, make one run between them (a row the parent creates, whose
    save fires the trigger, runs once, as the parent's child)."""
    trigger = triggers.get(trigger_name)
    if trigger is None:
        raise ValueError(f"no trigger is declared as {trigger_name!r}")
    run_key = trigger.run_key(row)
    return ChildFlow(
        trigger.deployment,
        trigger.parameters(row),
        key=f"{trigger_name}:{run_key}"[:MAX_KEY],
        idempotency_key=triggers.run_idempotency_key(trigger_name, run_key),
    )


def start(child: ChildRun) -> None:
    """Create the child's Prefect run unless it has one, was given up, or has ended."""
    if child.state == ChildRunState.DECLARED:
        children.claim(child)
        child.refresh_from_db()  # ours, or what another process of the parent (or a give-up) made of it
    if child.state != ChildRunState.CREATING:
        return  # running already, ended, or given up before its run was made
    # Idempotent in Prefect: a process of this parent that claimed the child and died before
    # recording its run is followed by one that finds the same run here.
    # Called from sync code, run_deployment returns the run itself (not a coroutine).
    flow_run = cast(
        FlowRun,
        run_deployment(
            child.deployment,
            parameters=child.parameters,
            idempotency_key=child.idempotency_key,
            timeout=0,
            as_subflow=False,
            tags=["emg", f"child-of-{child.parent_flow_run_id}"],
        ),
    )
    # One transaction: a child recorded as started is a child looked after (re-run if it crashes).
    with transaction.atomic():
        started = children.started(child, flow_run.id, "parent")
        if started:
            tended_runs.track(flow_run.id, f"child {child.key} of flow run {child.parent_flow_run_id}")
    if started:
        logger.info("child %s: flow run %s", child.key, flow_run.id)
        return
    child.refresh_from_db()
    if child.state == ChildRunState.CANCELLED and child.child_flow_run_id is None:
        # Given up and cancelled while we created it (the reconciler found no run by its key then):
        # what we made is no one's.
        logger.info("child %s was cancelled while its flow run %s was made; cancelling that", child.key, flow_run.id)
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.id, Cancelled(message="its child run was given up"), force=True)


def suspend_key(keys: Sequence[str], round_number: int) -> str:
    """The key of one round of waiting for these children: Prefect fires a pause key once per flow run
    and keeps it for ever, so each set of children and each round has its own."""
    digest = hashlib.sha256("\0".join(sorted(keys)).encode()).hexdigest()[:16]
    return f"children-n{len(keys)}-{digest}-wait-{round_number}"


def wait_for_children(parent: UUID, keys: list[str]) -> list[ChildResult]:
    """The children's results once all have ended; until then, suspend (once for all of them).

    Our database, not the suspension's return, says whether they have ended: a suspension under a
    key the run used before returns at once, and a resume may come for another reason.
    """
    while True:
        close_old_connections()
        rows = {child.key: child for child in ChildRun.objects.filter(parent_flow_run_id=parent, key__in=keys)}
        if all(child.is_final for child in rows.values()):
            children.release_for_parent(parent, keys, "flow", "its children had ended when it looked")
            return results([rows[key] for key in keys])
        round_number = children.open_round(children.rounds_read(parent, keys))
        if round_number is None:
            logger.info("waits for children re-opened meanwhile; reading them again")
            continue
        key = suspend_key(keys, round_number)
        pending = sorted(key for key, child in rows.items() if not child.is_final)
        logger.info("suspending until %s children end (%s...; key %s)", len(pending), pending[:3], key)
        close_old_connections()
        suspend_flow_run(timeout=settings.EMG_SUSPEND_TIMEOUT_SECONDS, key=key)


def results(ended: list[ChildRun]) -> list[ChildResult]:
    """How each ended child ended, with the value each completed child persisted: one Prefect read
    for all their states, then each persisted result from the result store."""
    ids = [child.child_flow_run_id for child in ended if child.child_flow_run_id is not None]
    states = {}
    if ids:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=len(ids))
        states = {run.id: run.state for run in runs}
    out = []
    for child in ended:
        value = None
        state = states.get(child.child_flow_run_id) if child.child_flow_run_id else None
        if child.state == ChildRunState.COMPLETED and state is not None and state.data is not None:
            try:
                value = state.result(raise_on_failure=False)
            except Exception as error:  # not persisted, or its store unreadable: the state is the result
                logger.info("child %s: no result to read (%s)", child.key, error)
        out.append(ChildResult(child.key, child.child_flow_run_id, child.state, child.outcome, value))
    failures = [result for result in out if not result.completed]
    if failures:
        raise ChildFlowFailed(failures, out)
    return out
