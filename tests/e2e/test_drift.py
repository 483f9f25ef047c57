"""Prefect drifting from our database, and cancellation of live flow processes, on the live stack.

A flow run deleted from Prefect gets a fresh run that finds its jobs again; a cancel in the same
tick still happens; a cancelled flow whose process is running is stopped (through Cancelling) and
declares nothing afterwards.
"""

import os
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.utils import timezone
from prefect.client.orchestration import get_client

from devstack.processes import wait_until
from emg.models import AnalysisRequest, ClusterJobState, JobWait, ReconcileTick
from tests.e2e.requests import final_request, jobs_of, new_request, state_names, suspended_on_pending_assembly
from tests.slurm import cluster_blocked, squeue_state

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.django_db(transaction=True)]

SLOW_STUDY = "PRJEB40408"  # the fake ENA answers it after 15 s: a long Running window


def ticks_since(moment) -> int:
    return ReconcileTick.objects.filter(started_at__gte=moment, finished_at__isnull=False).count()


def test_a_flow_run_deleted_while_suspended_is_replaced_and_a_cancel_in_the_same_tick_still_happens(stack):
    options = {"min_contig_length": 310}  # work no other test has done: both wait on the cluster
    with cluster_blocked():
        older = new_request("PRJEB40001", pipeline_options=options)
        deleted = new_request("PRJEB40002", pipeline_options=options)
        older_job = suspended_on_pending_assembly(older)
        deleted_job = suspended_on_pending_assembly(deleted)
        older.refresh_from_db()
        deleted.refresh_from_db()
        lost_run = deleted.flow_run_id

        assert older.request_cancel()
        with get_client(sync_client=True) as prefect:
            prefect.delete_flow_run(lost_run)
        moment = timezone.now()

        def replaced_and_cancelled():
            deleted.refresh_from_db()
            older.refresh_from_db()
            return deleted.flow_run_id != lost_run and older.status == "CANCELLED"

        wait_until(
            replaced_and_cancelled,
            timeout=60,
            interval=0.2,
            message="the deleted run is replaced and the older request cancelled",
        )
        assert ticks_since(moment) <= 3
        # The fresh run finds the pending job again instead of declaring its work twice.
        wait_until(
            lambda: (
                jobs_of(deleted).get("assembly") is not None
                and JobWait.objects.filter(flow_run_id=deleted.flow_run_id).exists()
            ),
            timeout=120,
            message="the fresh run waits on the assembly job",
        )
        assert JobWait.objects.get(flow_run_id=deleted.flow_run_id, step="assembly").job_id == deleted_job.id

    finished = final_request(deleted, stack, timeout=300)
    older_job.refresh_from_db()

    assert finished.status == "COMPLETED", finished.status_reason
    assert finished.flow_reruns == 1
    assert any("no longer exists in Prefect" in entry["detail"] for entry in finished.history)
    assert older_job.state == ClusterJobState.CANCELLED
    assert squeue_state(older_job.slurm_job_id) in ("", "COMPLETING")


def test_cancelling_a_request_whose_flow_process_runs_stops_the_process_and_nothing_is_declared_after(stack):
    request = new_request(SLOW_STUDY, pipeline_options={"min_contig_length": 320})

    def fetching():
        request.refresh_from_db()
        return request.flow_run_id and request.current_step == "fetching from ENA"

    wait_until(fetching, timeout=120, interval=0.2, message="the flow is fetching from the slow ENA")
    assert request.request_cancel()

    def stopped():
        return state_names(request.flow_run_id)[-1] == "Cancelled"

    wait_until(stopped, timeout=120, interval=0.5, message="the runner stopped the flow's process")
    request.refresh_from_db()

    assert request.status == AnalysisRequest.Status.CANCELLED
    assert "Cancelling" in state_names(request.flow_run_id)
    assert not JobWait.objects.filter(request=request).exists()
    # The fetch never finished: drop anything it cached, so no later test finds the slow study warm.
    storage = Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"])
    for path in storage.glob(f"{django_settings.EMG_INSTANCE_NAMESPACE}-fetch-ena-*-{SLOW_STUDY}"):
        path.unlink()
