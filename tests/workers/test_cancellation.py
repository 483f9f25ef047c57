"""Cancellation by state: whatever state a job is in, and however its request ended, no job that no
live request waits for is left pending or running in Slurm, and none is submitted for it later.

Real PostgreSQL, Slurm and Prefect; each test drives reconciler ticks itself.
"""

import pytest
from prefect.states import Cancelling, Completed

from emg import jobs, requests, waits
from emg.models import AnalysisRequest, ClusterJob, ClusterJobState
from emg.policies import ResubmitPolicy
from flows.cluster_jobs import declare_job
from tests.slurm import active_jobs_of, cluster_blocked, squeue_state
from tests.workers.flow_runs import await_job, request_with_flow_run, state_type
from tests.workers.ticking import job_ended, shell_job, tick_until

pytestmark = [pytest.mark.slurm, pytest.mark.django_db(transaction=True)]

CANCELLED = ClusterJobState.CANCELLED


def job_of_request(prefect, work_dir, name: str, script: str = "sleep 300", policy=ResubmitPolicy(), **resources):
    request = request_with_flow_run(prefect, "PRJEB30001")
    job = declare_job(shell_job(name, script, work_dir, **resources), policy=policy)
    await_job(request.flow_run_id, job, request)
    return request, job


def in_state(job: ClusterJob, *states: str):
    return lambda: ClusterJob.objects.get(id=job.id).state in states


def nothing_of_it_in_slurm(job: ClusterJob) -> bool:
    return active_jobs_of({job.fingerprint}) == []


def test_a_declared_job_of_a_cancelled_request_ends_before_slurm_ever_sees_it(make_reconciler, prefect, work_dir):
    request, job = job_of_request(prefect, work_dir, "cancelled-while-declared")
    assert request.request_cancel()

    make_reconciler().tick()

    job.refresh_from_db()
    assert job.state == CANCELLED and job.attempts == 0 and not job.slurm_job_id
    assert AnalysisRequest.objects.get(id=request.id).status == "CANCELLED"
    assert nothing_of_it_in_slurm(job)


@pytest.mark.parametrize("state", ["PENDING", "RUNNING"])
def test_a_submitted_job_of_a_cancelled_request_is_cancelled_in_slurm(make_reconciler, prefect, work_dir, state):
    reconciler = make_reconciler()
    request, job = job_of_request(prefect, work_dir, f"cancelled-while-{state.lower()}")
    if state == "PENDING":
        with cluster_blocked():
            tick_until(reconciler, in_state(job, "PENDING"), message="the job is pending")
            assert request.request_cancel()
            tick_until(reconciler, job_ended(job.id), message="the pending job ended")
    else:
        tick_until(reconciler, in_state(job, "RUNNING"), message="the job runs")
        assert request.request_cancel()
        tick_until(reconciler, job_ended(job.id), message="the running job ended")

    job.refresh_from_db()
    assert job.state == CANCELLED and job.cancel_requested_at is not None
    assert squeue_state(job.slurm_job_id) in ("", "COMPLETING") and nothing_of_it_in_slurm(job)
    assert [entry["state"] for entry in job.history][-2:] == [jobs.GIVEN_UP, "CANCELLED"]


def test_a_job_declared_again_after_running_out_of_memory_is_not_submitted_for_a_cancelled_request(
    make_reconciler, prefect, work_dir
):
    request, job = job_of_request(
        prefect,
        work_dir,
        "oom-then-cancelled",
        'python3 -c "x = bytearray(300 * 1024 * 1024)"',
        memory_mb=100,
        policy=ResubmitPolicy(memory_factor=4, max_attempts=3),
    )
    tick_until(make_reconciler(), lambda: ClusterJob.objects.get(id=job.id).slurm_job_id, message="submitted")
    # No room on the cluster from now on: the job declared again after its OUT_OF_MEMORY waits, holding no Slurm id.
    reconciler = make_reconciler(max_active_jobs=0)

    def declared_again():
        row = ClusterJob.objects.get(id=job.id)
        return row.state == ClusterJobState.DECLARED and row.retries == 1

    tick_until(reconciler, declared_again, timeout=120, message="the job ran out of memory and is declared again")
    assert request.request_cancel()
    reconciler.tick()

    job.refresh_from_db()
    assert job.state == CANCELLED and job.attempts == 1 and job.retries == 1
    assert nothing_of_it_in_slurm(job)


def test_the_jobs_of_a_request_failed_after_its_last_rerun_are_gone_from_the_queue_within_two_ticks(
    make_reconciler, prefect, work_dir
):
    reconciler = make_reconciler()
    request, job = job_of_request(prefect, work_dir, "request-failed")
    tick_until(reconciler, in_state(job, "PENDING", "RUNNING"), message="the job is in the queue")
    request.refresh_from_db()
    assert requests.fail(request, "flow run crashed and was re-run 3 times already")

    reconciler.tick()
    reconciler.tick()

    job.refresh_from_db()
    assert job.cancel_requested_at is not None
    assert squeue_state(job.slurm_job_id) in ("", "COMPLETING")


def test_the_jobs_of_a_request_cancelled_in_prefects_ui_are_gone_from_the_queue_within_two_ticks(
    make_reconciler, prefect, work_dir
):
    reconciler = make_reconciler()
    request, job = job_of_request(prefect, work_dir, "cancelled-in-the-ui")
    tick_until(reconciler, in_state(job, "PENDING", "RUNNING"), message="the job is in the queue")
    # What Prefect's UI does to a run: Cancelling, which a runner turns into Cancelled.
    prefect.set_flow_run_state(request.flow_run_id, Cancelling(message="cancelled in the UI"), force=True)

    reconciler.tick()
    reconciler.tick()

    request.refresh_from_db()
    job.refresh_from_db()
    assert request.status == "CANCELLED" and request.status_reason == "flow run cancelled in Prefect"
    assert job.cancel_requested_at is not None
    assert squeue_state(job.slurm_job_id) in ("", "COMPLETING")


def test_a_job_whose_policy_keeps_it_runs_on_when_its_request_is_cancelled(make_reconciler, prefect, work_dir):
    reconciler = make_reconciler()
    request, job = job_of_request(
        prefect, work_dir, "kept-for-reuse", "sleep 60", policy=ResubmitPolicy(cancel_when_unwanted=False)
    )
    tick_until(reconciler, in_state(job, "RUNNING"), message="the job runs")
    assert request.request_cancel()

    reconciler.tick()
    reconciler.tick()

    job.refresh_from_db()
    assert AnalysisRequest.objects.get(id=request.id).status == "CANCELLED"
    assert job.state == ClusterJobState.RUNNING and job.cancel_requested_at is None


def test_a_flow_attaching_to_a_job_given_up_meanwhile_declares_a_new_one_submitted_after_the_old_ends(
    make_reconciler, prefect, work_dir
):
    reconciler = make_reconciler()
    request, job = job_of_request(prefect, work_dir, "given-up-then-wanted", "sleep 300")
    tick_until(reconciler, in_state(job, "RUNNING"), message="the job runs")
    request.refresh_from_db()
    assert requests.fail(request, "ended")
    assert jobs.give_up(job, "no live request waits for it any more")

    later = request_with_flow_run(prefect, "PRJEB30002")
    # A flow that found the job before it was given up, attaching now: refused, and it declares anew.
    assert waits.attach(later.flow_run_id, "step", job.id, later.id) is None
    successor = declare_job(shell_job("given-up-then-wanted", "sleep 300", work_dir))
    assert successor.id != job.id and successor.fingerprint == job.fingerprint
    await_job(later.flow_run_id, successor, later)

    reports = tick_until(reconciler, job_ended(job.id), message="the given-up job ended")
    assert not [report for report in reports if successor.slurm_job_id in report.submitted]
    tick_until(reconciler, in_state(successor, "PENDING", "RUNNING"), message="the successor is submitted")
    successor.refresh_from_db()
    job.refresh_from_db()
    assert job.state == CANCELLED
    assert int(successor.slurm_job_id) > int(job.slurm_job_id)


def test_a_flow_run_marked_completed_while_its_request_is_unfinished_runs_again(make_reconciler, prefect, work_dir):
    request, job = job_of_request(prefect, work_dir, "completed-early", "sleep 1")
    prefect.set_flow_run_state(request.flow_run_id, Completed(message="marked by hand"), force=True)

    report = make_reconciler().tick()

    request.refresh_from_db()
    assert report.rerun == [request.flow_run_id]
    assert request.flow_reruns == 1 and request.status == "WAITING"
    assert state_type(prefect, request.flow_run_id) == "SCHEDULED"
