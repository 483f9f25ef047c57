"""A tick's cost in SQL does not grow with the work: the job states it reads are written in one
statement however many changed, unchanged rows are not written at all, and the history no tick
reads any more is pruned.

Real PostgreSQL and the real single-node Slurm cluster (held jobs: they never run).
"""

import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from devstack.processes import wait_until
from emg import jobs, triggers
from emg.models import (
    AnalysisRequest,
    ChildRun,
    ChildRunState,
    ClusterJob,
    ClusterJobState,
    JobWait,
    OutboxEvent,
    Study,
    TendedRun,
)
from slurm_adapter import JobSpec, JobState, JobStatus
from workers.reconcile.prune import prune_history
from workers.reconciler import TickReport

# Not transactional unless a test says so: rows of fake Slurm ids must stay invisible to the session
# stack's ticks, if it is running.
pytestmark = pytest.mark.django_db


def submitted_rows(count: int, **fields) -> list[ClusterJob]:
    spec = JobSpec(name="tick-cost", command=("true",), work_dir="/tmp", memory_mb=10, time_limit_minutes=1)
    return ClusterJob.objects.bulk_create(
        [
            ClusterJob(
                name=spec.name,
                fingerprint=uuid.uuid4().hex,
                spec=spec.to_dict(),
                state=ClusterJobState.SUBMITTED,
                slurm_job_id=str(900000 + n),
                attempts=1,
                submission_started_at=timezone.now(),
                **fields,
            )
            for n in range(count)
        ]
    )


def status(state: JobState, exit_code: int | None = None, signal: int | None = None) -> JobStatus:
    return JobStatus(
        job_id="",
        state=state,
        raw_state=state.value,
        exit_code=exit_code,
        signal=signal,
        submit_time=None,
        start_time=None,
        end_time=None,
        tag=None,
    )


def job_updates(queries) -> list[str]:
    return [
        query["sql"]
        for query in queries
        if query["sql"].startswith('UPDATE "emg_clusterjob"')
        or query["sql"].lstrip().startswith("UPDATE emg_clusterjob")
    ]


def test_statuses_of_many_jobs_are_recorded_in_one_statement_each_guarded_as_it_was_read():
    rows = submitted_rows(300)
    moved_on = rows[7]
    ClusterJob.objects.filter(id=moved_on.id).update(attempts=2)  # another tick resubmitted it meanwhile
    ended = status(JobState.FAILED, exit_code=3, signal=0)

    with CaptureQueriesContext(connection) as queries:
        applied = jobs.record_statuses(
            [(row, ended if n % 2 else status(JobState.PENDING)) for n, row in enumerate(rows)]
        )

    assert len(queries) == 1
    assert applied == {row.id for row in rows} - {moved_on.id}
    failed = ClusterJob.objects.get(id=rows[1].id)
    assert (failed.state, failed.exit_code, failed.signal) == (ClusterJobState.FAILED, 3, 0)
    assert failed.ended_at is not None and failed.history[-1]["state"] == "FAILED"
    assert failed.history[-1]["detail"] == "FAILED exit 3:0"
    pending = ClusterJob.objects.get(id=rows[0].id)
    assert (pending.state, pending.ended_at, pending.exit_code) == (ClusterJobState.PENDING, None, None)
    untouched = ClusterJob.objects.get(id=moved_on.id)
    assert untouched.state == ClusterJobState.SUBMITTED and untouched.history == []


def test_a_claim_that_changed_since_it_was_read_is_not_overwritten():
    (row,) = submitted_rows(1)
    ClusterJob.objects.filter(id=row.id).update(submission_started_at=timezone.now() + timedelta(seconds=1))
    assert jobs.record_statuses([(row, status(JobState.RUNNING))]) == set()
    assert ClusterJob.objects.get(id=row.id).state == ClusterJobState.SUBMITTED


@pytest.fixture
def held_jobs(cluster, work_dir):
    """Real Slurm jobs that never run (held), as many as asked for, cancelled at the end."""
    made = []

    def submit(count: int) -> list[ClusterJob]:
        spec = JobSpec(
            name="tick-cost-held",
            command=("true",),
            work_dir=str(work_dir),
            memory_mb=10,
            time_limit_minutes=1,
            extra_options=("--hold",),
        )
        submitted = [cluster.submit(spec, f"tick-cost-{uuid.uuid4().hex[:12]}") for _ in range(count)]
        made.extend(job.job_id for job in submitted)
        wait_until(
            lambda: {status.state for status in cluster.query(submitted).values()} == {JobState.PENDING},
            timeout=120,
            message="Slurm's accounting has every held job",
        )
        return ClusterJob.objects.bulk_create(
            [
                ClusterJob(
                    name=spec.name,
                    fingerprint=uuid.uuid4().hex,
                    spec=spec.to_dict(),
                    state=ClusterJobState.SUBMITTED,
                    slurm_job_id=job.job_id,
                    submit_time=job.submit_time,
                    log_path=job.log_path,
                    attempts=1,
                    state_checked_at=timezone.now(),
                )
                for job in submitted
            ]
        )

    yield submit
    for job_id in made:
        cluster.cancel(job_id)


def tick_queries(reconciler) -> tuple[TickReport, list[dict]]:
    with CaptureQueriesContext(connection) as queries:
        report = reconciler.tick()
    assert not report.errors, report.errors
    return report, list(queries)


@pytest.mark.slurm
@pytest.mark.django_db(transaction=True)
def test_a_tick_costs_the_same_statements_for_three_jobs_as_for_thirty_and_writes_no_unchanged_row(
    make_reconciler, held_jobs
):
    reconciler = make_reconciler()
    # A process looks some rows up once and keeps them (the content types the pruning names): a
    # first tick pays those lookups, so they are not counted against either size.
    tick_queries(reconciler)
    costs = {}
    for count in (3, 30):
        ClusterJob.objects.all().delete()
        rows = held_jobs(count)
        first, first_queries = tick_queries(reconciler)
        assert len(first.changed) == count and set(first.changed.values()) == {"PENDING"}
        assert len(job_updates(first_queries)) == 1
        written = dict(ClusterJob.objects.values_list("id", "updated_at"))

        steady, steady_queries = tick_queries(reconciler)
        assert steady.checked == count and not steady.changed
        assert steady.job_states_read_at is not None and steady.job_states_read_at > first.job_states_read_at
        assert job_updates(steady_queries) == []
        assert dict(ClusterJob.objects.values_list("id", "updated_at")) == written
        costs[count] = (len(first_queries), len(steady_queries))
        assert {row.id for row in rows} == set(written)
    assert costs[3] == costs[30], costs


def ended_request(study: Study, status=AnalysisRequest.Status.COMPLETED) -> AnalysisRequest:
    request = AnalysisRequest.objects.create(study=study)
    AnalysisRequest.objects.filter(id=request.id).update(status=status)  # as emg.requests would have left it
    return request


def test_old_history_of_ended_requests_is_pruned_and_what_a_live_request_may_need_is_kept(settings):
    settings.EMG_PRUNE_AFTER_DAYS = 30
    long_ago = timezone.now() - timedelta(days=31)
    recently = timezone.now() - timedelta(days=29)
    study = Study.objects.create(accession="PRJEB55701")
    (job,) = submitted_rows(1)
    ended_long_ago, ended_recently = ended_request(study), ended_request(study)
    live = AnalysisRequest.objects.create(study=study)
    for request, released_at in ((ended_long_ago, long_ago), (ended_recently, recently), (live, long_ago)):
        JobWait.objects.create(
            flow_run_id=uuid.uuid4(), step="assemble", job=job, request=request, released_at=released_at
        )
        OutboxEvent.objects.of(request).update(dispatched_at=released_at)
    AnalysisRequest.objects.filter(id=live.id).update(generation=2)  # run again: generation 1 is history
    live.refresh_from_db()
    triggers.saved(live)  # as emg.requests.rerun tells the triggers
    OutboxEvent.objects.of(live).filter(parameters__generation=2).update(dispatched_at=long_ago)

    report = TickReport()
    prune_history(None, report)

    assert report.pruned == {"waits": 1, "events": 2}
    assert set(JobWait.objects.values_list("request_id", flat=True)) == {ended_recently.id, live.id}
    assert set(OutboxEvent.objects.values_list("object_id", "parameters__generation")) == {
        (ended_recently.id, 1),
        (live.id, 2),
    }
    assert ClusterJob.objects.filter(id=job.id).exists()  # the record of what produced a result stays


def test_tended_runs_and_child_runs_ended_long_ago_are_pruned_and_live_or_recent_ones_kept(settings):
    settings.EMG_PRUNE_AFTER_DAYS = 30
    long_ago = timezone.now() - timedelta(days=31)
    recently = timezone.now() - timedelta(days=29)
    for n, ended_at in enumerate((long_ago, recently, None)):
        TendedRun.objects.create(flow_run_id=uuid.uuid4(), started_by=f"tended {n}", ended_at=ended_at)
    parent = uuid.uuid4()
    for key, state, ended_at, released_at in (
        ("ended-and-released", ChildRunState.COMPLETED, long_ago, long_ago),
        ("ended-recently", ChildRunState.COMPLETED, recently, recently),
        ("still-waited-for", ChildRunState.FAILED, long_ago, None),
        ("live", ChildRunState.RUNNING, None, None),
    ):
        ChildRun.objects.create(
            parent_flow_run_id=parent,
            key=key,
            deployment="d/e",
            idempotency_key=f"k-{key}",
            state=state,
            ended_at=ended_at,
            released_at=released_at,
        )

    report = TickReport()
    prune_history(None, report)

    assert report.pruned == {"tended runs": 1, "child runs": 1}
    assert set(TendedRun.objects.values_list("started_by", flat=True)) == {"tended 1", "tended 2"}
    assert set(ChildRun.objects.values_list("key", flat=True)) == {"ended-recently", "still-waited-for", "live"}


def test_pruning_is_off_when_the_age_is_zero(settings):
    settings.EMG_PRUNE_AFTER_DAYS = 0
    request = ended_request(Study.objects.create(accession="PRJEB55702"))
    OutboxEvent.objects.of(request).update(dispatched_at=timezone.now() - timedelta(days=3650))
    report = TickReport()
    prune_history(None, report)
    assert report.pruned == {} and OutboxEvent.objects.of(request).exists()
