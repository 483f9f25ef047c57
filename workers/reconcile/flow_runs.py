"""Resuming suspended flow runs whose jobs (or child runs) have ended, and re-running broken ones.

Asks Prefect only about the runs it may act on: resume candidates (all their jobs ended) read whole,
the other runs with an open wait or an unfinished request read only if they are in a state other
than Paused or Scheduled, and the rest counted, not read (read_runs_worth_reading).
Resumes the suspended runs whose awaited jobs, or awaited child runs (flows.child_flows, ended
by workers.reconcile.child_runs earlier in the tick), have all ended, oldest wait first, as many a tick as
Prefect accepts (workers.reconcile.resume_pace; the rest go to later ticks): Prefect accepts the
resume of a paused run once, so that transition is Prefect's own compare-and-set, and the waits
are released after it.
Re-runs in place any run that crashed, failed, went silent while Running (no heartbeat, and no
live process its runner vouches for: emg.leases) or stayed Pending, at
most `max_flow_reruns` times per request generation (a run that deferred its request is scheduled
for the time it asked instead, and costs no re-run): only the tick whose re-run count update
(emg.requests.count_rerun) applied sets the run Scheduled. Runs without a request (a trigger's run
of any other flow, a child run: emg.tended_runs) are re-run the same way when they crash or fall
silent, at most `max_flow_reruns` times each, counted on their TendedRun row; one that ended
(Completed, Cancelled, or Failed: its flow's own verdict) is no longer tended.
"""

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

import httpx
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.utils import timezone
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings
from prefect.states import Cancelled, Scheduled

from emg import children, leases, requests, tended_runs, triggers, waits
from emg.models import AnalysisRequest, ChildRun, JobWait, OutboxEvent, TendedRun
from flows.deployments import ANALYSIS_TRIGGER
from workers import dispatch
from workers.reconcile.resume_pace import is_throttling

logger = logging.getLogger(__name__)

PREFECT_FILTER_CHUNK = 200
# A count, or a read that returns few of the runs it names, carries few records back: many more
# ids fit in one call.
PREFECT_COUNT_CHUNK = 2000
# A run in one of these is waiting as it should (suspended on its jobs, or scheduled to run): the
# tick reads it only when it may act on it (a resume candidate), and otherwise only counts it.
QUIET_STATE_TYPES = {StateType.PAUSED, StateType.SCHEDULED}
QUIET = object()
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
# The most events one `POST /events/filter` may ask for (the API refuses more).
EVENTS_PAGE_LIMIT = 50
# A run that ended can no longer be waiting. Crashed runs are not here: their request is not
# finished, so the flow-run recovery re-runs them and they re-attach to their jobs.
ENDED_STATE_TYPES = {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED}
RECOVERABLE_STATE_TYPES = {StateType.CRASHED, StateType.FAILED}


@dataclass
class Waiting:
    """What one suspended run waits for: its open job waits, and its open waits on child runs
    (flows.child_flows). Ready to resume once every job and every child has ended."""

    job_waits: list[JobWait] = field(default_factory=list)
    children: list[ChildRun] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return all(wait.job.is_final for wait in self.job_waits) and all(child.is_final for child in self.children)

    @property
    def since(self) -> datetime:
        return min([wait.created_at for wait in self.job_waits] + [child.created_at for child in self.children])

    def release(self, why: str) -> int:
        released = waits.release([wait.id for wait in self.job_waits], "tick", why) if self.job_waits else 0
        if self.children:
            released += children.release([child.id for child in self.children], "tick", why)
        return released


def open_waits() -> dict[UUID, Waiting]:
    """Every run with an open wait (on jobs or on children), oldest wait first."""
    waiting: dict[UUID, Waiting] = defaultdict(Waiting)
    for wait in JobWait.objects.filter(released_at__isnull=True).select_related("job").order_by("created_at"):
        waiting[wait.flow_run_id].job_waits.append(wait)
    for child in ChildRun.objects.filter(released_at__isnull=True).order_by("created_at", "id"):
        waiting[child.parent_flow_run_id].children.append(child)
    return dict(sorted(waiting.items(), key=lambda item: item[1].since))


@dataclass(frozen=True)
class Keeper:
    """Who answers for a flow run's re-runs: its request (emg.requests) or its TendedRun row
    (emg.tended_runs). `count_rerun` is the compare-and-set the re-run waits on."""

    flow_run_id: UUID
    label: str
    reruns: int
    count_rerun: Callable[[str], bool]
    give_up: Callable[[str], object]


def request_keeper(request: AnalysisRequest) -> Keeper:
    assert request.flow_run_id is not None  # only requests with a flow run are tended
    return Keeper(
        request.flow_run_id,
        f"request #{request.id}",
        request.flow_reruns,
        lambda why: requests.count_rerun(request, why),
        lambda why: requests.fail(request, why),
    )


def tended_keeper(tended: TendedRun) -> Keeper:
    return Keeper(
        tended.flow_run_id,
        tended.started_by,
        tended.reruns,
        lambda why: tended_runs.count_rerun(tended, why),
        lambda why: tended_runs.end(tended, f"given up: {why}"),
    )


def tend_flow_runs(reconciler, report) -> None:
    waiting = open_waits()
    requests_by_run = {
        request.flow_run_id: request
        for request in AnalysisRequest.objects.unfinished().filter(flow_run_id__isnull=False)
    }
    tended = {run.flow_run_id: run for run in TendedRun.objects.live()}
    candidates = [run for run, what in waiting.items() if what.ready]
    others = list((waiting.keys() | requests_by_run.keys() | tended.keys()) - set(candidates))
    runs = read_runs_worth_reading(reconciler.prefect, candidates, others)
    # A lease no runner renewed for ten zombie thresholds vouches for nothing (its runner died).
    leases.forget_stale(timezone.now() - 10 * reconciler.zombie_after)
    resume_ready(reconciler, waiting, runs, report)
    recover_broken(reconciler, requests_by_run, runs, report)
    if tended:
        recover_tended(reconciler, tended, runs, report)


def resume_ready(reconciler, waiting: dict[UUID, Waiting], runs: dict, report) -> None:
    ready = []
    for flow_run_id, what in waiting.items():
        run = runs.get(flow_run_id)
        if run is QUIET:
            continue  # paused on jobs or children that have not all ended, or scheduled: nothing to do yet
        if run is None or run.state.type in ENDED_STATE_TYPES:
            why = "its flow run is gone" if run is None else f"its flow run has ended ({run.state.type.value})"
            report.released += what.release(why)
            continue
        if run.state.type == StateType.PAUSED and what.ready:
            ready.append((flow_run_id, what))
    if not ready:
        return
    pace = reconciler.resume_pace
    chosen = ready[: pace.budget]  # the rest go to later ticks, oldest wait first
    throttled = threading.Event()

    def resume(flow_run_id: UUID):
        if throttled.is_set():
            return None  # Prefect is struggling: the rest wait for a later tick
        try:
            # No retries inside the client (it would wait out a struggling server for half a
            # minute a call): the next tick is the retry, at a lower pace.
            with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}):
                return reconciler.prefect.resume_flow_run(flow_run_id)
        except Exception as error:
            if is_throttling(error):
                throttled.set()
                logger.info("resume of %s refused under load (%s); the next tick will look again", flow_run_id, error)
                return None
            return error

    started = time.monotonic()
    with ThreadPoolExecutor(max(1, min(pace.concurrency, len(chosen)))) as pool:
        outcomes = list(pool.map(resume, [flow_run_id for flow_run_id, _ in chosen]))
    seconds = time.monotonic() - started
    for (flow_run_id, what), outcome in zip(chosen, outcomes, strict=True):
        if outcome is None:
            continue
        if isinstance(outcome, httpx.HTTPStatusError):
            logger.info("resume of %s refused (%s); the next tick will look again", flow_run_id, outcome)
            continue
        if isinstance(outcome, Exception):  # one run's failure never stops the others' resumes
            report.errors.append(f"resume flow run {flow_run_id}: {outcome}")
            continue
        if outcome.status.value != "ACCEPT":
            # Resumed by someone else, or already moving on: normal, not an error.
            logger.info("resume of %s not accepted: %s", flow_run_id, outcome.details)
            continue
        what.release("what it waited for has ended and its flow run was resumed")
        report.resumed.append(flow_run_id)
    pace.settle(issued=len(chosen), throttled=throttled.is_set(), seconds=seconds)


def recover_broken(reconciler, requests_by_run: dict[UUID, AnalysisRequest], runs: dict, report) -> None:
    now = timezone.now()
    suspects = {}
    stuck_pending = {}
    for flow_run_id, request in requests_by_run.items():
        run = runs.get(flow_run_id)
        if run is QUIET:
            continue  # waiting as it should
        if request.cancel_requested_at is not None:
            continue  # workers.reconcile.cancellations has it
        try:
            if run is None:
                replace_deleted(reconciler, request, report)
            elif run.state.type == StateType.COMPLETED:
                # Marked Completed by hand, or a flow that returned without ending its request: it
                # has no outcome, so it runs again (and finds its jobs again).
                rerun(
                    reconciler,
                    request_keeper(request),
                    run.state,
                    f"flow run completed while the request is {request.status}",
                    report,
                )
            elif run.state.type == StateType.CANCELLING:
                # Cancelled in Prefect's UI (the runner stops the process and sets Cancelled); a run with
                # no process (suspended) would stay Cancelling for good: it is Cancelled by force.
                if requests.cancel(request, "flow run cancelled in Prefect"):
                    report.cancelled.append(request.id)
                if now - run.state.timestamp > reconciler.zombie_after:
                    reconciler.prefect.set_flow_run_state(
                        flow_run_id, Cancelled(message="cancelled in Prefect"), force=True
                    )
            elif run.state.type in RECOVERABLE_STATE_TYPES and request.deferred_until is not None:
                schedule_deferred(reconciler, request, report)
            elif run.state.type in RECOVERABLE_STATE_TYPES:
                rerun(reconciler, request_keeper(request), run.state, f"flow run {run.state.name.lower()}", report)
            elif run.state.type == StateType.CANCELLED:
                if requests.cancel(request, "flow run cancelled in Prefect"):
                    report.cancelled.append(request.id)
            elif run.state.type == StateType.RUNNING and now - run.state.timestamp > reconciler.zombie_after:
                suspects[flow_run_id] = (request_keeper(request), run.state)
            elif run.state.type == StateType.PENDING and now - run.state.timestamp > reconciler.zombie_after:
                # A runner sets Pending and starts the run's process within seconds; a runner that
                # died in between leaves it Pending for good (a restarted one takes Scheduled runs only).
                # A process frozen before it set Running still has its lease: not re-run.
                stuck_pending[flow_run_id] = (request_keeper(request), run.state)
        except Exception as error:  # one request's failure never stops the others' recovery
            logger.exception("recovering the flow run of request #%s failed", request.id)
            report.errors.append(f"recover request #{request.id}: {error}")
    rerun_silent(reconciler, suspects, stuck_pending, now, report)


def recover_tended(reconciler, tended: dict[UUID, TendedRun], runs: dict, report) -> None:
    """The runs without a request: ended ones no longer tended, broken ones re-run as a request's are."""
    now = timezone.now()
    of_requests = dict(
        AnalysisRequest.objects.filter(flow_run_id__in=list(tended)).values_list("flow_run_id", "status")
    )
    crashed: dict[UUID, tuple[Keeper, State]] = {}
    suspects: dict[UUID, tuple[Keeper, State]] = {}
    stuck_pending: dict[UUID, tuple[Keeper, State]] = {}
    for flow_run_id, row in tended.items():
        run = runs.get(flow_run_id)
        try:
            if flow_run_id in of_requests:
                # A request's run adopted as a child: its request re-runs it (recover_broken).
                status = of_requests[flow_run_id]
                if status in AnalysisRequest.FINAL_STATUSES and tended_runs.end(row, f"its request ended {status}"):
                    report.tended_ended += 1
            elif run is QUIET:
                continue  # suspended on its work, or scheduled: waiting as it should
            elif run is None:
                if tended_runs.end(row, "its flow run no longer exists in Prefect"):
                    report.tended_ended += 1
            elif run.state.type in (StateType.COMPLETED, StateType.CANCELLED, StateType.FAILED):
                # Failed is the flow's own verdict (its code raised): unlike a request's run, which
                # fails only by accident (its flow ends its request), it is not run again.
                outcome = run.state.name + (f": {run.state.message}" if run.state.message else "")
                if tended_runs.end(row, outcome):
                    report.tended_ended += 1
            elif run.state.type == StateType.CANCELLING and now - run.state.timestamp > reconciler.zombie_after:
                # No process to stop (it was suspended, or its runner is gone): it would stay Cancelling.
                reconciler.prefect.set_flow_run_state(
                    flow_run_id, Cancelled(message="cancelled in Prefect"), force=True
                )
            elif run.state.type == StateType.CRASHED:
                crashed[flow_run_id] = (tended_keeper(row), run.state)
            elif run.state.type == StateType.RUNNING and now - run.state.timestamp > reconciler.zombie_after:
                suspects[flow_run_id] = (tended_keeper(row), run.state)
            elif run.state.type == StateType.PENDING and now - run.state.timestamp > reconciler.zombie_after:
                stuck_pending[flow_run_id] = (tended_keeper(row), run.state)
        except Exception as error:  # one run's failure never stops the others' recovery
            logger.exception("tending flow run %s failed", flow_run_id)
            report.errors.append(f"tend flow run {flow_run_id}: {error}")
    to_rerun = crashed.keys() | suspects.keys() | stuck_pending.keys()
    if not to_rerun:
        return
    # A child its parent no longer waits for is being cancelled (workers.reconcile.child_runs): never re-run.
    given_up = set(
        ChildRun.objects.filter(child_flow_run_id__in=list(to_rerun), cancel_requested_at__isnull=False).values_list(
            "child_flow_run_id", flat=True
        )
    )
    for given_up_id in given_up:
        if given_up_id is not None and tended_runs.end(
            tended[given_up_id], "given up: its parent no longer waits for it"
        ):
            report.tended_ended += 1
    for flow_run_id, (keeper, state) in crashed.items():
        if flow_run_id in given_up:
            continue
        try:
            rerun(reconciler, keeper, state, "flow run crashed", report)
        except Exception as error:
            logger.exception("re-running flow run %s failed", flow_run_id)
            report.errors.append(f"re-run flow run {flow_run_id}: {error}")
    rerun_silent(
        reconciler,
        {key: value for key, value in suspects.items() if key not in given_up},
        {key: value for key, value in stuck_pending.items() if key not in given_up},
        now,
        report,
    )


def rerun_silent(reconciler, suspects: dict, stuck_pending: dict, now: datetime, report) -> None:
    """Of these Running runs, those with no heartbeat since the zombie threshold, and these stuck
    Pending ones, re-run, unless their runner still vouches for their process (a lease)."""
    since = now - reconciler.zombie_after
    silent = {}
    if suspects:
        beating = runs_with_recent_heartbeat(reconciler.prefect, list(suspects), since=since)
        silent = {
            flow_run_id: (keeper, state, "flow run stopped sending heartbeats and its runner holds no process")
            for flow_run_id, (keeper, state) in suspects.items()
            if flow_run_id not in beating
        }
    silent.update(
        {
            flow_run_id: (keeper, state, "flow run stuck Pending (its runner died before starting it)")
            for flow_run_id, (keeper, state) in stuck_pending.items()
        }
    )
    if not silent:
        return
    leased = leases.fresh(list(silent), since)
    report.leased += sorted(leased, key=str)
    for flow_run_id, (keeper, state, why) in silent.items():
        if flow_run_id in leased:
            logger.info("flow run %s (%s) is silent but its runner still holds its process", flow_run_id, keeper.label)
            continue
        try:
            rerun_dead(reconciler, keeper, state, since, why, report)
        except Exception as error:  # one run's failure never stops the others' recovery
            logger.exception("re-running the silent flow run of %s failed", keeper.label)
            report.errors.append(f"recover {keeper.label}: {error}")


def rerun_dead(reconciler, keeper: Keeper, state: State, since: datetime, why: str, report) -> None:
    """A silent run (Running with no heartbeat, or stuck Pending) is re-run only once its process is
    confirmed gone: its lease revoked (no runner renewed it since `since`) in the transaction that
    counts the re-run, so a runner renewing meanwhile keeps its run and costs it nothing."""
    with transaction.atomic():
        if not leases.revoke_stale(keeper.flow_run_id, since):
            logger.info("flow run %s was renewed by its runner meanwhile; not dead", keeper.flow_run_id)
            return
        # Prefect's state is set inside the transaction: should that fail, the re-run is not counted.
        rerun(reconciler, keeper, state, why, report)


def rerun(reconciler, keeper: Keeper, state: State, why: str, report) -> None:
    if keeper.reruns >= reconciler.max_flow_reruns:
        keeper.give_up(f"{why} and was re-run {keeper.reruns} times already: {state.message or ''}")
        return
    if not keeper.count_rerun(why):
        return  # another tick re-ran it, or it moved on
    reconciler.prefect.set_flow_run_state(
        keeper.flow_run_id, Scheduled(message=f"re-run by the reconciler: {why}"), force=True
    )
    logger.warning("re-running flow run %s (%s): %s", keeper.flow_run_id, keeper.label, why)
    report.rerun.append(keeper.flow_run_id)


def analysis_trigger() -> triggers.Trigger:
    trigger = triggers.get(ANALYSIS_TRIGGER)
    if trigger is None:
        raise ImproperlyConfigured(f"no trigger {ANALYSIS_TRIGGER!r} is declared (EMG_TRIGGER_MODULES)")
    return trigger


def replacement_key(request: AnalysisRequest) -> str:
    """The key of the run replacing a generation's deleted flow run: one per re-run the request counted."""
    trigger = analysis_trigger()
    return f"{triggers.run_idempotency_key(trigger.name, trigger.run_key(request))}:replacement:{request.flow_reruns}"


def create_replacement_run(request: AnalysisRequest) -> FlowRun:
    """A new run of the request's generation, as its trigger's event made the first one."""
    trigger = analysis_trigger()
    event = OutboxEvent(trigger=trigger.name, run_key=trigger.run_key(request), parameters=trigger.parameters(request))
    return dispatch.prefect_connection.create_run(
        trigger.deployment,
        parameters=event.parameters,
        idempotency_key=replacement_key(request),
        name=trigger.name_of_run(request, event),
        tags=trigger.tags_of_run(request, event),
    )


def replace_deleted(reconciler, request: AnalysisRequest, report) -> None:
    """The request's flow run was deleted from Prefect (or Prefect lost its database): a fresh run,
    with a key of its own, taken from the re-run budget. A replacement that an earlier tick made
    but died before recording is found by its key, not made twice."""
    lost = request.flow_run_id
    assert lost is not None  # only requests with a flow run are tended
    why = f"its flow run {lost} no longer exists in Prefect"
    new_id = dispatch.flow_run_id_by_key(replacement_key(request)) if request.flow_reruns else None
    if new_id is None or new_id == lost:
        if request.flow_reruns >= reconciler.max_flow_reruns:
            requests.fail(request, f"{why}, and the request was re-run {request.flow_reruns} times already")
            return
        if not requests.count_rerun(request, why):
            return
        request.refresh_from_db()  # its re-run count, which names the replacement's key
        new_id = create_replacement_run(request).id
    if requests.replace_flow_run(request.id, request.generation, lost, new_id, why):
        logger.warning("request #%s: %s; replaced by flow run %s", request.id, why, new_id)
        report.flow_runs_replaced.append(new_id)


def schedule_deferred(reconciler, request: AnalysisRequest, report) -> None:
    """A run that ended after deferring its request (emg.requests.defer) runs again when it asked to,
    taken from the deferral and not from the request's re-run budget."""
    if not requests.take_deferral(request):
        return
    reconciler.prefect.set_flow_run_state(
        request.flow_run_id,
        Scheduled(scheduled_time=request.deferred_until, message=f"deferred by the flow: {request.status_reason}"),
        force=True,
    )
    logger.info("flow run %s of request #%s deferred until %s", request.flow_run_id, request.id, request.deferred_until)
    report.deferred.append(request.flow_run_id)


def read_flow_runs(
    prefect, flow_run_ids: list[UUID], state: FlowRunFilterState | None = None, ids_per_call: int = PREFECT_FILTER_CHUNK
) -> dict:
    """The runs among these (in `state`, if given), by id: one call per `ids_per_call` ids, and more
    only where a page (at most 200 runs) came back full."""
    runs = {}
    for start in range(0, len(flow_run_ids), ids_per_call):
        chunk = flow_run_ids[start : start + ids_per_call]
        offset = 0
        while True:
            page = prefect.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk), state=state),
                limit=PREFECT_FILTER_CHUNK,
                offset=offset,
            )
            runs.update({run.id: run for run in page})
            if len(page) < PREFECT_FILTER_CHUNK:
                break
            offset += len(page)
    return runs


def read_runs_worth_reading(prefect, candidates: list[UUID], others: list[UUID]) -> dict:
    """What the tick needs to know of these runs, asking Prefect for as little as it can.

    Resume candidates (every job they wait for has ended) are read whole. Of the others, only runs
    in a state the tick acts on: a run Paused on unfinished jobs, or Scheduled, is what nearly every
    waiting run is, and comes back as QUIET, confirmed by one count (not read). Should the count
    fall short (a run was deleted, or changed state between the two calls), they are read whole.
    """
    runs = read_flow_runs(prefect, candidates)
    if not others:
        return runs
    acting = read_flow_runs(
        prefect,
        others,
        FlowRunFilterState(type=FlowRunFilterStateType(not_any_=sorted(QUIET_STATE_TYPES))),
        ids_per_call=PREFECT_COUNT_CHUNK,
    )
    runs.update(acting)
    quiet = [flow_run_id for flow_run_id in others if flow_run_id not in acting]
    if not quiet:
        return runs
    counted = sum(
        prefect.count_flow_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=quiet[start : start + PREFECT_COUNT_CHUNK]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=sorted(QUIET_STATE_TYPES))),
            )
        )
        for start in range(0, len(quiet), PREFECT_COUNT_CHUNK)
    )
    if counted == len(quiet):
        runs.update(dict.fromkeys(quiet, QUIET))
    else:
        runs.update(read_flow_runs(prefect, quiet))
    return runs


def runs_with_recent_heartbeat(prefect, flow_run_ids: list[UUID], since: datetime) -> set[UUID]:
    """Runs among these that sent a heartbeat since `since`.

    One events query for all of them; only when its page came back full (the API returns at
    most `EVENTS_PAGE_LIMIT` events, and a busy run sends several) is each run not seen in it
    asked about alone, so that a live run is never taken for a zombie for lack of room.
    """
    events = heartbeats(prefect, flow_run_ids, since, EVENTS_PAGE_LIMIT)
    alive = {heartbeat_run_id(event) for event in events}
    if len(events) >= EVENTS_PAGE_LIMIT:
        for flow_run_id in flow_run_ids:
            if flow_run_id not in alive and heartbeats(prefect, [flow_run_id], since, 1):
                alive.add(flow_run_id)
    return alive


def heartbeats(prefect, flow_run_ids: list[UUID], since: datetime, limit: int) -> list[dict]:
    response = prefect.request(
        "POST",
        "/events/filter",
        json={
            "filter": {
                "occurred": {"since": since.isoformat()},
                "event": {"name": [HEARTBEAT_EVENT]},
                "resource": {"id": [f"prefect.flow-run.{run_id}" for run_id in flow_run_ids]},
            },
            "limit": limit,
        },
    )
    return response.json().get("events", [])


def heartbeat_run_id(event: dict) -> UUID:
    return UUID(event["resource"]["prefect.resource.id"].removeprefix("prefect.flow-run."))
