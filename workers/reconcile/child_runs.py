"""Tending child flow runs (flows.child_flows): their ends recorded, and those no one waits for cancelled.

Each tick reads, in one batched Prefect call (read_flow_runs with an id filter, 200 ids a call),
the state of every live child run and of the parents of live children; then, per child, isolated
from the others:
- a child whose parent was cancelled (Cancelling or Cancelled in Prefect), deleted from Prefect,
  or whose request was cancelled or has ended, is given up (emg.children.give_up);
- a child whose run has ended (Completed, Failed, Cancelled, Crashed; or deleted) is ended with
  Prefect's state (emg.children.end): the parent's resume then follows in this same tick
  (workers.reconcile.flow_runs, once every child it waits for has ended). A run that crashed is
  not ended while it is still tended (emg.tended_runs): the reconciler re-runs it in place, and
  the child ends only with its last run;
- a given-up child is stopped as a request's flow run is (workers.reconcile.cancellations): one
  with a live process moved to Cancelling, so its runner kills it, one with none (suspended,
  scheduled) Cancelled at once, one left Cancelling past the zombie threshold Cancelled by force.
  Its cluster jobs follow by the existing path: its waits are released once its run has ended, and
  the reaper gives up and scancels every job no live wait wants any more.
A child claimed but not yet recorded (its parent's process died between creating it and
recording it) is found by its idempotency key when it is given up, or left to the parent's next
run, which finds it the same way.
"""

import logging
from uuid import UUID

from django.utils import timezone
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelled, Cancelling

from emg import children
from emg.models import ChildRun, ChildRunState, TendedRun
from workers.reconcile.flow_runs import read_flow_runs

logger = logging.getLogger(__name__)

PARENT_CANCELLED = {StateType.CANCELLING, StateType.CANCELLED}
WITH_A_PROCESS = {StateType.RUNNING, StateType.PENDING}
ENDED = {
    StateType.COMPLETED: ChildRunState.COMPLETED,
    StateType.FAILED: ChildRunState.FAILED,
    StateType.CANCELLED: ChildRunState.CANCELLED,
    StateType.CRASHED: ChildRunState.CRASHED,
}


def tend_child_runs(reconciler, report) -> None:
    live = list(ChildRun.objects.live().select_related("request").order_by("created_at", "id"))
    if not live:
        return
    ids: set[UUID] = {child.parent_flow_run_id for child in live}
    ids |= {child.child_flow_run_id for child in live if child.child_flow_run_id is not None}
    runs = read_flow_runs(reconciler.prefect, sorted(ids, key=str))
    being_rerun = set(
        TendedRun.objects.live()
        .filter(flow_run_id__in=[child.child_flow_run_id for child in live if child.child_flow_run_id is not None])
        .values_list("flow_run_id", flat=True)
    )
    for child in live:
        try:
            tend(reconciler, child, runs, being_rerun, report)
        except Exception as error:  # one child's failure never stops the others
            logger.exception("tending child run #%s failed", child.id)
            report.errors.append(f"child run #{child.id} ({child.key}): {error}")


def unwanted(child: ChildRun, runs: dict) -> str | None:
    """Why no one waits for this child any more, or None."""
    request = child.request
    if request is not None and (request.cancel_requested_at is not None or request.is_final):
        return f"its request #{request.id} is {'being cancelled' if not request.is_final else request.status}"
    parent = runs.get(child.parent_flow_run_id)
    if parent is None:
        return f"its parent flow run {child.parent_flow_run_id} no longer exists in Prefect"
    if parent.state is not None and parent.state.type in PARENT_CANCELLED:
        return f"its parent flow run {child.parent_flow_run_id} was cancelled"
    return None


def tend(reconciler, child: ChildRun, runs: dict, being_rerun: set[UUID], report) -> None:
    run = runs.get(child.child_flow_run_id) if child.child_flow_run_id else None
    if child.state == ChildRunState.RUNNING:
        if run is None:
            if children.end(child, ChildRunState.FAILED, f"its flow run {child.child_flow_run_id} no longer exists"):
                report.children_ended.append(child.id)
            return
        # A run re-run in place (workers.reconcile.flow_runs) has not ended: its last run's end is the child's.
        rerun = run.state is not None and run.state.type == StateType.CRASHED and run.id in being_rerun
        if run.state is not None and run.state.type in ENDED and not rerun:
            outcome = f"{run.state.name}" + (f": {run.state.message}" if run.state.message else "")
            if children.end(child, ENDED[run.state.type], outcome):
                report.children_ended.append(child.id)
            return
    if child.cancel_requested_at is None:
        why = unwanted(child, runs)
        if why is None or not children.give_up(child, why):
            return
        logger.info("child run #%s (%s): %s; cancelling it", child.id, child.key, why)
        report.children_given_up.append(child.id)
        child.refresh_from_db()
        if child.is_final:
            return
    stop(reconciler, child, run)


def stop(reconciler, child: ChildRun, run) -> None:
    """One step towards a given-up child's end; its end is recorded once Prefect reports it."""
    if child.state == ChildRunState.CREATING:
        found = reconciler.prefect.read_flow_runs(
            flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=[child.idempotency_key])),
            limit=1,
        )
        if found:
            children.started(child, found[0].id, "reconciler")  # cancelled from the next tick on
        elif child.claimed_at is None or timezone.now() - child.claimed_at > reconciler.zombie_after:
            children.cancel_uncreated(child, "given up before its flow run was created")
        return
    if run is None or run.state is None:
        return
    why = "its parent no longer waits for it"
    if run.state.type in WITH_A_PROCESS:
        reconciler.prefect.set_flow_run_state(run.id, Cancelling(message=why), force=True)
    elif run.state.type == StateType.CANCELLING:
        if timezone.now() - run.state.timestamp > reconciler.zombie_after:
            reconciler.prefect.set_flow_run_state(run.id, Cancelled(message=why), force=True)
    elif run.state.type not in ENDED:
        reconciler.prefect.set_flow_run_state(run.id, Cancelled(message=why), force=True)
