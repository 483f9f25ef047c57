"""Carrying out the cancellations operators asked for.

Per request, isolated from the others: its flow run is stopped and the request ends CANCELLED if
it is still what was read (a run that completed meanwhile stands). Its jobs are then no longer
wanted by it: the reaper (workers.reconcile.reaper) stops each one no other live request waits
for, whatever state it is in, in this same tick.

A flow run with a live process (Running, or Pending while its process starts) is moved to
Cancelling, so that its runner kills the process (a run forced straight to Cancelled keeps
running: the runner stops only runs in Cancelling); one with no process (suspended, scheduled)
is Cancelled at once; one left in Cancelling past the zombie threshold (its runner is gone) is
Cancelled by force. A flow run deleted from Prefect has nothing to stop.
"""

import logging

from django.utils import timezone
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Cancelling

from emg import requests
from emg.models import AnalysisRequest

logger = logging.getLogger(__name__)

WITH_A_PROCESS = {StateType.RUNNING, StateType.PENDING}
ENDED = {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}
REASON = "cancelled by an operator"


def cancel_requested(reconciler, report) -> None:
    for request in AnalysisRequest.objects.filter(cancel_requested_at__isnull=False).unfinished():
        try:
            cancel_request(reconciler, request, report)
        except Exception as error:  # one request's failure never stops the others' cancellation
            logger.exception("cancelling request #%s failed", request.id)
            report.errors.append(f"cancel request #{request.id}: {error}")


def cancel_request(reconciler, request: AnalysisRequest, report) -> None:
    if request.flow_run_id:
        stop_flow_run(reconciler, request)
    if requests.cancel(request, REASON):
        report.cancelled.append(request.id)


def stop_flow_run(reconciler, request: AnalysisRequest) -> None:
    try:
        run = reconciler.prefect.read_flow_run(request.flow_run_id)
    except ObjectNotFound:
        logger.warning("request #%s: its flow run %s no longer exists in Prefect", request.id, request.flow_run_id)
        return
    state = run.state.type if run.state else None
    if state in ENDED:
        return
    if state in WITH_A_PROCESS:
        reconciler.prefect.set_flow_run_state(request.flow_run_id, Cancelling(message=REASON), force=True)
    elif state != StateType.CANCELLING or timezone.now() - run.state.timestamp > reconciler.zombie_after:
        reconciler.prefect.set_flow_run_state(request.flow_run_id, Cancelled(message=REASON), force=True)
