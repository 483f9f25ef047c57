"""Submission is fenced by compare-and-set, not by the tick lock: overlapping ticks never submit an attempt twice.

Real PostgreSQL and the real single-node Slurm cluster. The ticks here run without the tick lock,
in threads, with a Slurm client whose sbatch is slow or answers late on command, which is what a
busy controller, a frozen worker or a lost lock does to the real stack. What ran is counted from
Slurm's own accounting by tag.
"""

import subprocess
import threading
from datetime import timedelta

import pytest
from django.db import connections

from devstack.processes import wait_until
from emg.models import ClusterJob, ClusterJobState, job_tag
from flows.cluster_jobs import declare_job
from slurm_adapter import ClusterError, JobSpec, SlurmCluster
from tests.slurm import slurm_jobs_tagged
from tests.workers.conftest import DEFAULT_LIMITS
from tests.workers.flow_runs import await_job, request_with_flow_run
from tests.workers.ticking import job_ended, shell_job, tick_until
from workers.reconcile import orphans, submissions
from workers.reconciler import Reconciler, TickReport

pytestmark = [pytest.mark.slurm, pytest.mark.django_db(transaction=True)]

COMPLETED = ClusterJobState.COMPLETED


class SlowSbatch(SlurmCluster):
    """The real client, whose sbatch waits `delay` seconds before it answers (the job is queued at once)."""

    def __init__(self, delay: float, **options):
        super().__init__(**options)
        self.delay = delay
        self.sbatch_calls = 0
        self._lock = threading.Lock()

    def submit(self, spec: JobSpec, tag: str):
        with self._lock:
            self.sbatch_calls += 1
        submitted = super().submit(spec, tag)
        threading.Event().wait(self.delay)  # the answer is late; the job already exists
        return submitted


def tick_in_threads(reconcilers: list[Reconciler], rounds: int) -> list:
    """Every reconciler ticks `rounds` times, all of them at once, each in a thread of its own."""
    reports, errors = [], []

    def run(reconciler: Reconciler) -> None:
        try:
            for _ in range(rounds):
                reports.append(reconciler.tick())
        except Exception as error:  # surfaced by the test, not lost in the thread
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(reconciler,)) for reconciler in reconcilers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    return reports


def unlocked(cluster, **limits) -> Reconciler:
    # No lock: these ticks overlap on purpose.
    return Reconciler(cluster, None, **{**DEFAULT_LIMITS, **limits})


def test_three_overlapping_ticks_with_a_slow_sbatch_submit_each_declared_job_exactly_once(
    reconcile_lock, cancel_left_jobs, work_dir
):
    jobs = [declare_job(shell_job(f"overlapped-{n}", f"sleep 1; echo {n}", work_dir)) for n in range(5)]
    cluster = SlowSbatch(delay=2, accounting_grace_s=30)

    reports = tick_in_threads([unlocked(cluster) for _ in range(3)], rounds=2)

    submitted = [job_id for report in reports for job_id in report.submitted]
    assert [error for report in reports for error in report.errors] == []
    assert len(submitted) == len(set(submitted)) == 5
    assert cluster.sbatch_calls == 5
    tick_until(
        unlocked(SlurmCluster(accounting_grace_s=30)),
        lambda: all(ClusterJob.objects.get(id=job.id).is_final for job in jobs),
        message="all five ended",
    )
    for job in jobs:
        job.refresh_from_db()
        assert (job.state, job.attempts) == (COMPLETED, 1)
        assert slurm_jobs_tagged(job.tag, including=[job.slurm_job_id]) == [job.slurm_job_id]


class AnswerHeldBack(SlurmCluster):
    """sbatch queues the job at once, but its first answer is held until the test lets it go."""

    def __init__(self, **options):
        super().__init__(**options)
        self.sbatch_started = threading.Event()
        self.release_answer = threading.Event()
        self.first_job_id: str | None = None

    def submit(self, spec: JobSpec, tag: str):
        submitted = super().submit(spec, tag)
        if self.first_job_id is None:
            self.first_job_id = submitted.job_id
            self.sbatch_started.set()
            assert self.release_answer.wait(timeout=300)
        return submitted


def test_a_late_sbatch_answer_leaves_the_job_another_tick_adopted_by_its_tag_alone(
    reconcile_lock, cancel_left_jobs, work_dir
):
    job = declare_job(shell_job("late-answer", "sleep 10", work_dir))
    late = AnswerHeldBack(accounting_grace_s=30)
    # The first tick freezes inside sbatch long past the claim lease (here: no lease at all).
    frozen = unlocked(late, claim_lease=timedelta(0))
    frozen_tick = threading.Thread(target=lambda: (frozen.tick(), connections.close_all()))
    frozen_tick.start()
    assert late.sbatch_started.wait(timeout=120)

    # Meanwhile another tick finds the claim stale. Its tag look-up finds the queued job and adopts it...
    other = unlocked(SlurmCluster(accounting_grace_s=30), claim_lease=timedelta(0))
    report = other.tick()
    job.refresh_from_db()
    assert report.errors == []
    assert report.adopted == [late.first_job_id] and job.slurm_job_id == late.first_job_id

    late.release_answer.set()
    frozen_tick.join(timeout=120)
    job.refresh_from_db()
    # ...so the frozen tick's late answer finds its claim taken, by its own job: it records nothing and
    # cancels nothing.
    assert (job.slurm_job_id, job.attempts) == (late.first_job_id, 1)
    assert [entry["detail"] for entry in job.history].count(f"sbatch -> {late.first_job_id}") == 0
    tick_until(other, job_ended(job.id), timeout=120)
    assert ClusterJob.objects.get(id=job.id).state == COMPLETED
    # Accounting shows a job's comment reliably once it has ended.
    assert slurm_jobs_tagged(job.tag, including=[late.first_job_id]) == [late.first_job_id]


def test_a_claim_superseded_before_its_job_reached_slurm_never_leaves_a_second_job_running(
    reconcile_lock, cancel_left_jobs, work_dir
):
    """The frozen tick's sbatch reaches Slurm only after another tick found nothing under its tag and
    submitted the next attempt: the frozen tick's record fails, and it cancels what it queued."""
    job = declare_job(shell_job("superseded-claim", "sleep 5", work_dir))
    frozen_cluster = SlurmCluster(accounting_grace_s=30)
    frozen = unlocked(frozen_cluster, claim_lease=timedelta(0))
    claim = submissions.jobs.claim(job)
    assert claim is not None
    job.refresh_from_db()

    # Another tick: the claim is stale, its tag unknown to Slurm, so attempt 2 is claimed and submitted.
    first = unlocked(SlurmCluster(accounting_grace_s=30), claim_lease=timedelta(0)).tick()
    assert len(first.submitted) == 1
    # Now the frozen tick's sbatch (attempt 1) lands, late.
    submissions.sbatch(frozen, claim, job, report := TickReport())
    assert report.submitted == [] and "superseded" in report.errors[0]

    tick_until(unlocked(SlurmCluster(accounting_grace_s=30)), job_ended(job.id))
    job.refresh_from_db()
    assert (job.state, job.attempts, job.slurm_job_id) == (COMPLETED, 2, first.submitted[0])
    [late_job] = slurm_jobs_tagged(claim.tag)
    assert slurm_state(late_job).startswith("CANCELLED")
    assert slurm_jobs_tagged(job.tag, including=[job.slurm_job_id]) == [job.slurm_job_id]


def slurm_state(job_id: str) -> str:
    return subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True, timeout=30
    ).stdout.strip()


class FailsFirstSbatch(SlurmCluster):
    def __init__(self, error: Exception, **options):
        super().__init__(**options)
        self.error = error
        self.failed = False

    def submit(self, spec: JobSpec, tag: str):
        if not self.failed:
            self.failed = True
            raise self.error
        return super().submit(spec, tag)


def test_a_transient_sbatch_error_backs_off_then_the_next_attempt_is_submitted_once(
    reconcile_lock, cancel_left_jobs, work_dir, monkeypatch
):
    monkeypatch.setattr(submissions, "FIRST_BACKOFF", timedelta(0))
    job = declare_job(shell_job("transient-error", "true", work_dir))
    cluster = FailsFirstSbatch(
        ClusterError("sbatch exited with 1: Socket timed out on send/recv operation"), accounting_grace_s=30
    )
    reconciler = unlocked(cluster)

    first = reconciler.tick()
    job.refresh_from_db()
    assert first.submitted == [] and "Socket timed out" in first.errors[0]
    assert (job.state, job.attempts, job.next_submit_at is not None) == (ClusterJobState.DECLARED, 1, True)
    assert "Socket timed out" in job.submit_error

    tick_until(reconciler, job_ended(job.id))
    job.refresh_from_db()
    assert (job.state, job.attempts) == (COMPLETED, 2)
    assert slurm_jobs_tagged(job.tag, including=[job.slurm_job_id]) == [job.slurm_job_id]


def test_a_job_slurm_refuses_for_good_is_rejected_with_slurms_message_and_the_others_run(make_reconciler, work_dir):
    good = [declare_job(shell_job(f"beside-a-bad-one-{n}", f"echo {n}", work_dir)) for n in range(4)]
    bad = declare_job(
        JobSpec(
            name="bad-partition",
            command=("true",),
            work_dir=str(work_dir),
            memory_mb=100,
            time_limit_minutes=1,
            partition="no-such-partition",
        )
    )

    reports = tick_until(
        make_reconciler(), lambda: all(ClusterJob.objects.get(id=job.id).is_final for job in [*good, bad])
    )

    bad.refresh_from_db()
    assert bad.state == ClusterJobState.REJECTED and "invalid partition" in bad.submit_error.lower()
    assert "Slurm refused the job" in bad.outcome
    assert reports[0].rejected == [bad.id]  # rejected in its first tick, not retried
    assert all(ClusterJob.objects.get(id=job.id).state == COMPLETED for job in good)


def test_a_live_slurm_job_of_a_superseded_attempt_is_cancelled_and_the_current_one_left_alone(
    make_reconciler, cluster, work_dir, monkeypatch
):
    monkeypatch.setattr(orphans, "SWEEP_INTERVAL_SECONDS", 0)
    job = declare_job(shell_job("has-an-orphan", "sleep 30", work_dir))
    reconciler = make_reconciler()
    tick_until(reconciler, lambda: ClusterJob.objects.get(id=job.id).state != ClusterJobState.DECLARED)
    job.refresh_from_db()
    # What a frozen tick leaves behind when its late sbatch lands after its claim was superseded,
    # and it dies before cancelling: a live job under an attempt the row no longer has.
    assert job.attempts == 1
    orphan = cluster.submit(JobSpec.from_dict(job.spec), tag=job_tag(job.fingerprint, job.id, 0))

    report = reconciler.tick()

    assert report.orphans_cancelled == [orphan.job_id]
    assert job.slurm_job_id not in report.orphans_cancelled
    wait_until(lambda: slurm_state(orphan.job_id).startswith("CANCELLED"), timeout=30, message="the orphan ended")
    assert not ClusterJob.objects.get(id=job.id).is_final


@pytest.mark.parametrize(
    ("row", "job_id", "attempt", "orphan"),
    [
        (dict(state="RUNNING", attempts=2, slurm_job_id="20"), "10", 1, True),  # a superseded attempt
        (dict(state="RUNNING", attempts=2, slurm_job_id="20"), "20", 2, False),  # the row's own job
        (dict(state="RUNNING", attempts=2, slurm_job_id="20"), "21", 2, True),  # a twin of the row's attempt
        (dict(state="DECLARED", attempts=2, slurm_job_id=""), "21", 2, False),  # its answer may be on its way
        (dict(state="CANCELLED", attempts=2, slurm_job_id=""), "21", 2, True),  # ended without it
        (dict(state="REJECTED", attempts=1, slurm_job_id=""), "21", 1, True),
        (dict(state="DECLARED", attempts=1, slurm_job_id=""), "21", 2, False),  # newer than our read of the row
    ],
)
def test_which_jobs_are_orphans(row, job_id, attempt, orphan):
    assert orphans.is_orphan(ClusterJob(**row), job_id, attempt) is orphan


def test_cancelling_a_request_finds_the_job_its_lost_sbatch_answer_queued_and_cancels_it(
    make_reconciler, prefect, cluster, work_dir
):
    request = request_with_flow_run(prefect, "PRJEB55601")
    job = declare_job(shell_job("cancel-while-claimed", "sleep 120", work_dir))
    await_job(request.flow_run_id, job, request)
    # Claimed and queued, but the submitting tick died before it recorded the answer.
    claim = submissions.jobs.claim(job)
    queued = cluster.submit(JobSpec.from_dict(claim.spec), tag=claim.tag)
    assert request.request_cancel()

    report = make_reconciler().tick()

    assert report.adopted == [queued.job_id] and report.cancelled == [request.id]
    wait_until(lambda: slurm_state(queued.job_id).startswith("CANCELLED"), timeout=60, message="the job is cancelled")
    request.refresh_from_db()
    assert request.status == "CANCELLED"
    assert [entry["state"] for entry in request.history][-1] == "CANCELLED"
