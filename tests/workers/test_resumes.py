"""The reconciler resumes suspended flow runs gently, and never leaves one waiting forever.

Real Slurm jobs and real flow runs on the session's Prefect server; the flow runs are moved
through the states a waiting flow goes through (tests/workers/flow_runs.py), the test drives the ticks.
"""


import pytest
from prefect.client.schemas.objects import StateType

from devstack.processes import wait_until
from emg.models import ClusterJob, ClusterJobState, JobWait
from flows.cluster_jobs import declare_job
from slurm_adapter import SubmittedJob
from tests.workers.flow_runs import await_job, new_flow_run, set_running, state_type, suspend
from tests.workers.ticking import RecordedLogs, job_ended, shell_job, tick_until

pytestmark = [pytest.mark.slurm, pytest.mark.django_db(transaction=True)]

STORM = 50
RESUMES_PER_TICK = 10


def test_fifty_jobs_ending_in_one_tick_are_resumed_ten_per_tick_oldest_first_none_lost_none_logged(
    make_reconciler, prefect, cluster, work_dir
):
    go = work_dir / "go"
    # Every job waits for the same file, so all fifty end within a moment of each other.
    jobs = [declare_job(shell_job(f"storm-{n}", f"while [ ! -e {go} ]; do sleep 0.2; done; echo {n}", work_dir,
                                  memory_mb=20)) for n in range(STORM)]
    runs = [new_flow_run(prefect) for _ in jobs]
    for run, job in zip(runs, jobs):
        await_job(run, job)
    reconciler = make_reconciler(resumes_per_tick=RESUMES_PER_TICK)
    tick_until(reconciler, lambda: ClusterJob.objects.filter(state=ClusterJobState.RUNNING).count() == STORM,
               timeout=180, message="all fifty jobs running")
    for run in runs:
        suspend(prefect, run, key="jobs-wait-1")

    go.touch()
    submitted = [SubmittedJob(job.slurm_job_id, job.submit_time, job.log_path)
                 for job in ClusterJob.objects.order_by("id")]
    wait_until(lambda: all(status.state.is_final for status in cluster.query(submitted).values()), timeout=60,
               interval=0.5, message="Slurm has all fifty jobs ended")
    with RecordedLogs("workers", "emg", "flows") as logs:
        reports = tick_until(reconciler, lambda: not JobWait.objects.filter(released_at__isnull=True).exists(),
                             timeout=60, interval=0.2, message="every wait released")

    assert len(reports[0].changed) == STORM  # the first tick saw all of them end
    assert [len(report.resumed) for report in reports] == [RESUMES_PER_TICK] * (STORM // RESUMES_PER_TICK)
    resumed = [run for report in reports for run in report.resumed]
    assert resumed == runs  # each once, oldest wait first
    assert {state_type(prefect, run) for run in runs} == {StateType.SCHEDULED}
    assert [f"{r.levelname} {r.name}: {r.getMessage()}" for r in logs.records] == []


def test_job_that_ends_before_its_flow_run_suspends_is_resumed_within_two_ticks_of_the_suspension(
    make_reconciler, prefect, work_dir
):
    # The flow declared the job and is still running: between its last check of the job and
    # its suspension, the reconciler sees the job end.
    run = new_flow_run(prefect)
    set_running(prefect, run)
    job = declare_job(shell_job("ends-early", "true", work_dir))
    await_job(run, job)
    reconciler = make_reconciler()
    before = tick_until(reconciler, job_ended(job.id), message="the job ended while its flow ran")
    assert not any(report.resumed or report.rerun for report in before)
    assert state_type(prefect, run) == StateType.RUNNING

    suspend(prefect, run, key=f"jobs-{job.id}-n1-wait-1")
    after = [reconciler.tick() for _ in range(2)]

    assert run in after[0].resumed + after[1].resumed
    assert state_type(prefect, run) == StateType.SCHEDULED
    assert not any(report.errors for report in after)
