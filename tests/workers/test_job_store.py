"""A cluster job is declared once, submitted once by the one submitter, and retried as its policy says.

Real PostgreSQL and the real single-node Slurm cluster; each test drives reconciler ticks itself
(see conftest.py) and counts what Slurm ran by tag in its own accounting.
"""

import json
import subprocess
import sys
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from devstack.processes import ROOT, wait_until
from emg.models import AnalysisRequest, ClusterJob, ClusterJobState
from emg.policies import ResubmitPolicy, Reuse
from flows.cluster_jobs import declare_job
from slurm_adapter import JobSpec
from tests.services import django_process_env
from tests.slurm import slurm_jobs_tagged
from tests.workers.flow_runs import await_job, request_with_flow_run, state_type
from tests.workers.ticking import ActiveJobSampler, job_ended, run_job, shell_job, submitted, tick_until

pytestmark = [pytest.mark.slurm, pytest.mark.django_db(transaction=True)]

COMPLETED = ClusterJobState.COMPLETED
# Fails the first time it runs in its work dir, succeeds every time after.
FAILS_ONCE = "if [ -e ran-once ]; then exit 0; fi; touch ran-once; exit 3"


def stale_claim_time():
    """A claim time older than the claim lease, so the next tick looks the claim's tag up."""
    return timezone.now() - timedelta(seconds=settings.EMG_SUBMIT_CLAIM_LEASE_SECONDS + 60)


def states_seen(job: ClusterJob) -> list[str]:
    return [entry["state"] for entry in job.history]


def sbatch_ids(job: ClusterJob) -> list[str]:
    """The Slurm id of each attempt, as the reconciler recorded its submissions."""
    details = [entry["detail"] for entry in job.history]
    return [detail.removeprefix("sbatch -> ") for detail in details if detail.startswith("sbatch -> ")]


def test_twenty_concurrent_declarations_from_separate_processes_give_one_row_and_one_slurm_job(
    make_reconciler, work_dir
):
    spec = shell_job("declared-twenty-times", "sleep 1", work_dir)

    result = subprocess.run(
        [sys.executable, "-m", "tests.workers.declare_concurrently", json.dumps(spec.to_dict()), "20"],
        cwd=ROOT,
        env=django_process_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout)

    assert len(set(answers["pids"])) == 20
    assert len(answers["job_ids"]) == 20 and len(set(answers["job_ids"])) == 1
    assert ClusterJob.objects.count() == 1
    job = ClusterJob.objects.get()
    tick_until(make_reconciler(), job_ended(job.id))
    job.refresh_from_db()
    assert job.state == COMPLETED
    assert slurm_jobs_tagged(job.tag, including=[job.slurm_job_id]) == [job.slurm_job_id]


def test_job_queued_by_an_sbatch_whose_answer_was_lost_is_adopted_by_tag_not_submitted_again(
    make_reconciler, cluster, work_dir
):
    job = declare_job(shell_job("lost-sbatch-answer", "sleep 2", work_dir))
    # What the reconciler records just before sbatch (its claim); sbatch then queues the job, but the
    # submitter dies before it can save the id. The claim is older than its lease: that sbatch has returned.
    ClusterJob.objects.filter(id=job.id).update(submission_started_at=stale_claim_time(), attempts=1)
    job.refresh_from_db()
    lost = cluster.submit(JobSpec.from_dict(job.spec), tag=job.tag)

    reports = tick_until(make_reconciler(), job_ended(job.id))

    job.refresh_from_db()
    assert [job_id for report in reports for job_id in report.adopted] == [lost.job_id]
    assert submitted(reports) == []
    assert (job.slurm_job_id, job.state, job.attempts) == (lost.job_id, COMPLETED, 1)
    assert slurm_jobs_tagged(job.tag, including=[lost.job_id]) == [lost.job_id]


def test_lost_sbatch_of_a_resubmission_is_not_confused_with_the_earlier_identical_job(make_reconciler, work_dir):
    policy = ResubmitPolicy(reuse=Reuse.NEVER)
    spec = shell_job("resubmitted-then-lost", "echo run >> runs.txt", work_dir)
    reconciler = make_reconciler()
    first = run_job(reconciler, spec, policy)
    second = declare_job(spec, policy=policy)
    # The resubmission's sbatch dies before queueing anything: its attempt has the same
    # fingerprint and number as the first row's, but the first row's job is not its job.
    ClusterJob.objects.filter(id=second.id).update(submission_started_at=stale_claim_time(), attempts=1)

    reports = tick_until(reconciler, job_ended(second.id))

    second.refresh_from_db()
    assert [job_id for report in reports for job_id in report.adopted] == []
    assert second.slurm_job_id not in ("", first.slurm_job_id) and second.state == COMPLETED
    assert (work_dir / "runs.txt").read_text().splitlines() == ["run", "run"]


def test_with_a_cap_of_two_six_jobs_never_have_more_than_two_active_and_run_in_declaration_order(
    make_reconciler, work_dir
):
    jobs = [declare_job(shell_job(f"capped-{n}", f"sleep 3; echo {n}", work_dir)) for n in range(6)]
    reconciler = make_reconciler(max_active_jobs=2)

    with ActiveJobSampler(job.fingerprint for job in jobs) as sampler:
        tick_until(
            reconciler,
            lambda: all(ClusterJob.objects.get(id=job.id).is_final for job in jobs),
            timeout=120,
            message="all six capped jobs ended",
        )

    for job in jobs:
        job.refresh_from_db()
    assert [job.state for job in jobs] == [COMPLETED] * 6
    assert max(sampler.samples) == 2, sampler.samples  # the cap was reached, and never passed
    slurm_ids = [int(job.slurm_job_id) for job in jobs]  # Slurm numbers jobs in submission order
    assert slurm_ids == sorted(slurm_ids)


def test_reuse_any_returns_an_earlier_failed_job_without_a_new_submission(make_reconciler, work_dir):
    policy = ResubmitPolicy(reuse=Reuse.ANY)
    spec = shell_job("reuse-any", "exit 3", work_dir)
    first = run_job(make_reconciler(), spec, policy)
    assert first.state == ClusterJobState.FAILED

    again = declare_job(spec, policy=policy)

    assert again.id == first.id
    assert ClusterJob.objects.count() == 1
    assert slurm_jobs_tagged(first.tag, including=[first.slurm_job_id]) == [first.slurm_job_id]


def test_reuse_if_succeeded_returns_an_earlier_completed_job(make_reconciler, work_dir):
    spec = shell_job("reuse-completed", "true", work_dir)
    first = run_job(make_reconciler(), spec, ResubmitPolicy(reuse=Reuse.IF_SUCCEEDED))

    assert declare_job(spec, policy=ResubmitPolicy(reuse=Reuse.IF_SUCCEEDED)).id == first.id
    assert slurm_jobs_tagged(first.tag, including=[first.slurm_job_id]) == [first.slurm_job_id]


def test_reuse_if_succeeded_resubmits_an_earlier_failed_job_which_then_completes(make_reconciler, work_dir):
    policy = ResubmitPolicy(reuse=Reuse.IF_SUCCEEDED)
    spec = shell_job("resubmit-failed", FAILS_ONCE, work_dir)
    reconciler = make_reconciler()
    first = run_job(reconciler, spec, policy)
    assert first.state == ClusterJobState.FAILED and first.exit_code == 3

    second = run_job(reconciler, spec, policy)

    assert second.id != first.id and second.fingerprint == first.fingerprint
    assert second.state == COMPLETED
    assert len({first.slurm_job_id, second.slurm_job_id}) == 2


def test_reuse_never_resubmits_even_an_earlier_completed_job(make_reconciler, work_dir):
    policy = ResubmitPolicy(reuse=Reuse.NEVER)
    spec = shell_job("always-resubmit", "echo run >> runs.txt", work_dir)
    reconciler = make_reconciler()
    first = run_job(reconciler, spec, policy)

    second = run_job(reconciler, spec, policy)

    assert (first.state, second.state) == (COMPLETED, COMPLETED)
    assert second.id != first.id
    assert (work_dir / "runs.txt").read_text().splitlines() == ["run", "run"]


def test_max_age_reuses_a_recent_job_but_resubmits_one_that_ended_too_long_ago(make_reconciler, work_dir):
    policy = ResubmitPolicy(reuse=Reuse.ANY, max_age_seconds=3600)
    spec = shell_job("max-age", "echo run >> runs.txt", work_dir)
    reconciler = make_reconciler()
    first = run_job(reconciler, spec, policy)
    assert declare_job(spec, policy=policy).id == first.id

    # The same job, had it ended two hours ago.
    ClusterJob.objects.filter(id=first.id).update(ended_at=timezone.now() - timedelta(hours=2))
    second = run_job(reconciler, spec, policy)

    assert second.id != first.id and second.state == COMPLETED
    assert (work_dir / "runs.txt").read_text().splitlines() == ["run", "run"]


def test_preparation_command_runs_before_a_resubmitted_job_and_not_before_the_first(make_reconciler, work_dir):
    policy = ResubmitPolicy(reuse=Reuse.NEVER, prepare_on_resubmit="echo prepared >> runs.txt")
    spec = shell_job("prepared", "echo run >> runs.txt", work_dir)
    reconciler = make_reconciler()
    first = run_job(reconciler, spec, policy)
    assert (work_dir / "runs.txt").read_text().splitlines() == ["run"]

    second = run_job(reconciler, spec, policy)

    assert second.state == COMPLETED and second.fingerprint == first.fingerprint
    assert (work_dir / "runs.txt").read_text().splitlines() == ["run", "prepared", "run"]


def test_job_out_of_memory_is_resubmitted_with_more_memory_and_completes(make_reconciler, work_dir):
    # The node's cgroups enforce --mem: this is a real OUT_OF_MEMORY, not a recorded one.
    spec = shell_job("needs-300mb", 'python3 -c "x = bytearray(300 * 1024 * 1024)"', work_dir, memory_mb=100)
    policy = ResubmitPolicy(memory_factor=4, max_attempts=3)

    job = run_job(make_reconciler(), spec, policy, timeout=120)

    assert job.state == COMPLETED
    assert (job.attempts, job.spec["memory_mb"]) == (2, 400)
    assert "OUT_OF_MEMORY" in states_seen(job)
    first, second = sbatch_ids(job)
    assert slurm_jobs_tagged(f"{job.fingerprint[:16]}-{job.id}-1", including=[first]) == [first]
    assert slurm_jobs_tagged(job.tag, including=[second]) == [second] == [job.slurm_job_id]


@pytest.mark.slow
def test_job_out_of_time_is_resubmitted_with_more_time_and_completes(make_reconciler, work_dir):
    # Slurm limits are whole minutes: the first attempt overruns its one minute; the second (which
    # Slurm is asked to give two) finishes at once, so the test waits out one limit, not two.
    spec = shell_job(
        "overruns-once", "if [ -e overran ]; then exit 0; fi; touch overran; sleep 600", work_dir, time_limit_minutes=1
    )

    job = run_job(make_reconciler(), spec, ResubmitPolicy(time_factor=2), timeout=240)

    assert job.state == COMPLETED
    assert (job.attempts, job.spec["time_limit_minutes"]) == (2, 2)
    assert "TIMEOUT" in states_seen(job) and len(sbatch_ids(job)) == 2
    first, second = sbatch_ids(job)
    limits = wait_until(
        lambda: slurm_time_limits([first, second]),
        timeout=60,
        message="Slurm's accounting has both attempts' time limits",
    )
    assert limits == {first: 1, second: 2}  # what Slurm was really asked for


def slurm_time_limits(job_ids: list[str]) -> dict[str, int] | None:
    """Each job's time limit in minutes, as Slurm's accounting recorded it; None until it has them all."""
    output = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-o", "JobID,TimelimitRaw", "-j", ",".join(job_ids)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    found = dict(line.split("|") for line in output.split())
    if set(found) != set(job_ids) or not all(limit.isdigit() for limit in found.values()):
        return None
    return {job_id: int(limit) for job_id, limit in found.items()}


def test_edited_input_file_gives_a_new_job_and_an_untouched_one_reuses_the_old(make_reconciler, work_dir):
    samplesheet = work_dir / "samplesheet.csv"
    samplesheet.write_text("sample,reads\nA,a.fastq.gz\n")
    spec = shell_job("with-samplesheet", "cat samplesheet.csv", work_dir)
    reconciler = make_reconciler()
    first = run_job(reconciler, spec, inputs=[samplesheet])

    untouched = declare_job(spec, [samplesheet])
    samplesheet.write_text("sample,reads\nA,a.fastq.gz\nB,b.fastq.gz\n")
    edited = run_job(reconciler, spec, inputs=[samplesheet])

    assert untouched.id == first.id
    assert edited.id != first.id and edited.fingerprint != first.fingerprint
    assert (first.state, edited.state) == (COMPLETED, COMPLETED)
    assert slurm_jobs_tagged(edited.tag, including=[edited.slurm_job_id]) == [edited.slurm_job_id]


def test_cancel_stops_the_flow_run_and_its_own_jobs_but_leaves_a_job_another_live_request_needs(
    make_reconciler, prefect, work_dir
):
    cancelled = request_with_flow_run(prefect, "PRJEB20001")
    other = request_with_flow_run(prefect, "PRJEB20002")
    own = declare_job(shell_job("only-the-cancelled-needs-it", "sleep 120; echo own", work_dir))
    shared = declare_job(shell_job("both-need-it", "sleep 120; echo shared", work_dir))
    await_job(cancelled.flow_run_id, own, cancelled, step="own")
    await_job(cancelled.flow_run_id, shared, cancelled, step="shared")
    await_job(other.flow_run_id, shared, other, step="shared")
    reconciler = make_reconciler()
    tick_until(
        reconciler,
        lambda: ClusterJob.objects.filter(state=ClusterJobState.RUNNING).count() == 2,
        message="both jobs running",
    )

    assert cancelled.request_cancel()
    tick_until(reconciler, job_ended(own.id), message="the cancelled request's own job ended")

    cancelled.refresh_from_db()
    own.refresh_from_db()
    shared.refresh_from_db()
    assert cancelled.status == AnalysisRequest.Status.CANCELLED
    # A Running flow run is asked to stop through Cancelling: its runner kills the process, then sets Cancelled.
    assert state_type(prefect, cancelled.flow_run_id) == "CANCELLING"
    assert own.state == ClusterJobState.CANCELLED
    assert shared.state == ClusterJobState.RUNNING
    assert state_type(prefect, other.flow_run_id) == "RUNNING"
