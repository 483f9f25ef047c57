"""Each declared job attempt reaches Slurm exactly once, whatever stalls, freezes or restarts around its submission.

Each test runs a stack of its own (Redis, Prefect runner, Celery workers and beat; for one, a
PostgreSQL server too) whose Slurm commands go through the fault shim (tests/slurm_faults),
saves requests, and lets the stack run them with no manual step. Then Slurm's own accounting,
which a bug in our database cannot fake, is held against the rows: no tag was submitted twice,
every Slurm job of a row is one the row's history records, and every request ended as its input
says (all COMPLETED but one deliberately bad request in the last test).

The faults are long compared with the reconcile tick's lock, which these stacks give a 10 s
lifetime (EMG_RECONCILE_LOCK_SECONDS; a reconciler that needs no such lifetime ignores it) while
beat sends a tick every second (tests/settings.py): a stall or freeze of 3 times the lifetime is
what matters, not the absolute times, which keep each test to a few minutes.
"""

import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.utils import timezone

from devstack.processes import ROOT, ManagedProcess, WaitTimeout, wait_until
from devstack.services import free_port, start_redis
from devstack.stack import Stack
from emg.models import AnalysisRequest, ClusterJob, JobWait, ReconcileTick
from tests.e2e.chaos import (
    OwnPostgres,
    freeze_for,
    parent_pid,
)
from tests.e2e.requests import assert_exactly_once_in_slurm, final_request, jobs_of, new_request, state_names
from tests.services import broker_at
from tests.slurm import cancel_jobs_under
from tests.slurm_faults import SlurmFaults

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

LOCK_SECONDS = 10
FAULT_SECONDS = 3 * LOCK_SECONDS
# In every assembly job's sbatch --job-name: faults matched on it hit the first step of each
# request only, so the later steps run at normal speed and each test stays short.
ASSEMBLY = "emg-assembly-"
# Three requests, two assembly jobs (the two PRJEB40001 requests share theirs): a tick that starts
# with this backlog has another job to submit after the one a fault catches it in.
BACKLOG = ["PRJEB40001", "PRJEB40002", "PRJEB40001"]
COMPLETED = AnalysisRequest.Status.COMPLETED
# A deadline, not a duration: on an idle machine these requests end 1 to 3 minutes after the
# fault; on a machine shared with other test sessions (a load of 20, another session's job
# holding the node) each resume of a flow can take a minute.
COMPLETION_DEADLINE = 480


@dataclass
class FaultyStack:
    """A stack of a test's own whose Slurm commands go through the fault shim, on a Redis of its own."""

    stack: Stack
    faults: SlurmFaults
    redis: ManagedProcess
    redis_port: int
    # Every job of this stack works here: fresh fingerprints (no job of another test is reused
    # or adopted), and what is left on the cluster afterwards is found by its directory.
    work_dir: Path
    log_dir: Path
    started_at: datetime

    def restart_redis(self) -> None:
        """Kill Redis and start it again, empty: no queue, no lock, no beat schedule survive."""
        self.redis.kill()
        self.redis.process.wait(timeout=30)
        self.redis = start_redis(self.redis_port, self.log_dir, self.stack.env, self.redis.name)

    def jobs(self) -> list[ClusterJob]:
        return list(ClusterJob.objects.filter(spec__work_dir__startswith=str(self.work_dir)))

    def logs(self) -> str:
        return self.stack.logs()


@pytest.fixture(scope="module")
def session_paused(stack):
    """The session's runner, worker and beat stay stopped while this module's stacks run."""
    with stack.paused():
        yield stack


@pytest.fixture
def make_stack(session_paused, service_logs, tmp_path):
    """Starts a FaultyStack (runner and worker; the test starts the beat when it is ready), and
    stops it after the test, cancelling whatever it left on the cluster."""
    log_dir = service_logs / "exactly-once"
    log_dir.mkdir(exist_ok=True)
    made: list[FaultyStack] = []
    with ExitStack() as exits:

        def make(label: str, *, database_url: str | None = None, **env: str) -> FaultyStack:
            faults = SlurmFaults(tmp_path / f"{label}-slurm-faults")
            work_dir = Path(settings.EMG_WORK_DIR) / "exactly-once" / uuid.uuid4().hex[:12]
            work_dir.mkdir(parents=True)
            port = free_port()
            url = f"redis://127.0.0.1:{port}/0"
            environment = {
                **session_paused.env,
                "REDIS_URL": url,
                "CELERY_BROKER_URL": url,
                "EMG_WORK_DIR": str(work_dir),
                "EMG_RESULTS_DIR": str(work_dir / "results"),
                "EMG_RECONCILE_LOCK_SECONDS": str(LOCK_SECONDS),
                # A frozen or restarted worker's unacknowledged events come back within seconds.
                "EMG_CELERY_VISIBILITY_TIMEOUT": "10",
                # The cap counts every emg-tagged job of this Slurm user, other sessions' included.
                "EMG_MAX_ACTIVE_JOBS": "1000000",
                **faults.env(session_paused.env),
                **env,
            }
            if database_url is not None:
                environment["DATABASE_URL"] = database_url
                subprocess.run(
                    [sys.executable, "manage.py", "migrate", "--noinput"],
                    env=environment,
                    cwd=ROOT,
                    check=True,
                    capture_output=True,
                    timeout=300,
                )
            own = FaultyStack(
                stack=Stack(environment, log_dir, label=label),
                faults=faults,
                redis=start_redis(port, log_dir, environment, f"{label}-redis"),
                redis_port=port,
                work_dir=work_dir,
                log_dir=log_dir,
                started_at=timezone.now(),
            )
            made.append(own)
            exits.enter_context(broker_at(url, REDIS_URL=url))  # the test process publishes there too
            own.stack.start(beat=False)
            return own

        try:
            yield make
        finally:
            for own in made:
                own.stack.stop()
                cancel_jobs_under(str(own.work_dir))
                own.redis.stop()


def backlog_declared(own: FaultyStack, studies: list[str]) -> list[AnalysisRequest]:
    """Save requests while the beat is down, wait until each flow has declared its assembly job,
    then start the beat: its first tick finds them all declared, a backlog to submit."""
    requests = [new_request(study) for study in studies]
    wait_until(
        lambda: all("assembly" in jobs_of(request) for request in requests),
        timeout=120,
        interval=0.5,
        message="every request's flow declared its assembly job",
    )
    own.stack.beat.start()
    return requests


def all_final(requests: list[AnalysisRequest], own, timeout: float) -> list[AnalysisRequest]:
    """Wait for every request to end, `timeout` seconds for them all."""
    deadline = time.monotonic() + timeout
    return [final_request(request, own, timeout=max(5.0, deadline - time.monotonic())) for request in requests]


def assert_completed(requests: list[AnalysisRequest]) -> None:
    assert {r.id: (r.status, r.status_reason) for r in requests} == {
        r.id: (COMPLETED, r.status_reason) for r in requests
    }


def completed_exactly_once(own: FaultyStack, requests: list[AnalysisRequest]) -> None:
    """Every request COMPLETED, and Slurm ran each job attempt once. Should the requests not
    finish, Slurm is asked first all the same: a twin, if there is one, is the failure to report."""
    try:
        finished = all_final(requests, own, timeout=COMPLETION_DEADLINE)
    except WaitTimeout:
        assert_exactly_once_in_slurm(own.jobs())
        raise
    assert_completed(finished)
    assert_exactly_once_in_slurm(own.jobs())


def assert_ticks_never_overlapped(since: datetime) -> None:
    ticks = list(ReconcileTick.objects.filter(started_at__gte=since, finished_at__isnull=False).order_by("started_at"))
    overlapping = [(a.id, b.id) for a, b in zip(ticks, ticks[1:]) if b.started_at < a.finished_at]
    assert not overlapping, f"ticks ran at the same time: {overlapping}"


def test_a_submission_answered_after_three_lock_lifetimes_is_one_slurm_job(make_stack):
    """The first sbatch creates its job at once but answers 30 s later, while beat sends a tick
    every second: the late answer and the ticks meanwhile end up with one Slurm job per attempt,
    nothing runs that a row's history does not record, and no two ticks run at once."""
    own = make_stack("sbatch-answers-late")
    # The first submission only: one late answer is the fault; more would only make the test longer.
    own.faults.stall("sbatch", FAULT_SECONDS, when="after", times=1, match=ASSEMBLY)

    requests = backlog_declared(own, BACKLOG)
    completed_exactly_once(own, requests)

    assert any(call.get("stalled_after") == FAULT_SECONDS for call in own.faults.calls("sbatch"))
    assert_ticks_never_overlapped(own.started_at)


def test_a_worker_frozen_in_the_middle_of_a_submission_leaves_one_slurm_job_per_attempt(make_stack):
    """The Celery tick worker running the tick is SIGSTOPped (its main process and the pool process
    in the tick) while that tick's sbatch is out, and continued 30 s later, while a second tick
    worker takes the beat's ticks. 30 s rather than minutes: it is 3 lock lifetimes, so any lock the frozen tick
    took has long expired, and a frozen process holds whatever it held for as long as it is frozen.
    Afterwards: one Slurm job per attempt, and no two ticks ran at once."""
    own = make_stack("worker-frozen")
    second = own.stack.start_another_worker("reconcile")
    # The job is created at once and its id told 5 s later: the freeze lands while sbatch is out.
    own.faults.stall("sbatch", 5, when="after", match=ASSEMBLY)

    requests = backlog_declared(own, BACKLOG)
    # A worker that loses its broker connection while frozen may exit: a supervisor starts it
    # again. (Only now: it would start the beat too, before the backlog is declared.)
    with own.stack.supervised() as revived:
        [call, *_] = wait_until(
            lambda: own.faults.calls("sbatch"), timeout=60, interval=0.1, message="a tick ran sbatch"
        )
        pool = call["ppid"]  # the shim's parent: the pool process running the tick
        worker = parent_pid(pool)
        assert worker in {own.stack.tick_worker.process.pid, second.process.pid}
        freeze_for([worker, pool], FAULT_SECONDS)
        completed_exactly_once(own, requests)

    print(f"started again by the supervisor: {revived}")
    assert_ticks_never_overlapped(own.started_at)


def test_redis_restarted_empty_while_a_tick_submits_leaves_one_slurm_job_per_attempt(make_stack):
    """The first sbatch hangs 30 s before it reaches the controller; meanwhile Redis (the broker,
    the beat schedule, whatever else is kept there) is killed and started again empty. The hung
    submission and everything the stack does after the restart end up with one Slurm job per
    attempt, and no two ticks run at once."""
    own = make_stack("redis-restarted")
    own.faults.stall("sbatch", FAULT_SECONDS, when="before", times=1, match=ASSEMBLY)

    requests = backlog_declared(own, BACKLOG)
    # A worker may not survive its Redis restarting: a supervisor starts it again, as in production.
    with own.stack.supervised() as revived:
        wait_until(lambda: own.faults.calls("sbatch"), timeout=60, interval=0.1, message="a tick ran sbatch")
        own.restart_redis()
        [first, *_] = own.faults.calls("sbatch")
        assert first["outcome"] is None  # the restart happened while that submission hung
        completed_exactly_once(own, requests)

    print(f"started again by the supervisor: {revived}")
    assert_ticks_never_overlapped(own.started_at)


# --- PostgreSQL restarted ----------------------------------------------------------------------

# Run by the stack's own Python with the stack's environment: requests saved in its database,
# their events published to its Redis, exactly as a save in the Django admin would.
SAVE_REQUESTS = """
import sys
import django
django.setup()
from tests.e2e.requests import new_request
print(" ".join(str(new_request(accession).id) for accession in sys.argv[1:]))
"""


def rows(database_url: str, sql: str, params=()) -> list[tuple]:
    # A new connection each time: the server restarts under these queries.
    with psycopg.connect(database_url, connect_timeout=5) as connection:
        return connection.execute(sql, params).fetchall()


@pytest.fixture
def own_postgres(service_logs):
    postgres = OwnPostgres(free_port(), service_logs).start()
    yield postgres
    postgres.stop()


def test_postgresql_restarted_while_jobs_pend_and_flows_are_suspended(own_postgres, make_stack):
    """The stack's database server (not only its connections) restarts with `pg_ctl restart -m
    fast` while every request's job is pending in Slurm and every flow is suspended: the worker,
    beat and runner carry on against the restarted server by themselves, each request COMPLETES,
    and each job ran once.

    The stack's Django database is on a PostgreSQL server of this test's own, so restarting it
    touches no one else; the test process's own Django connection stays on pytest-django's test
    database (it cannot follow a server pytest-django does not manage), so this test talks to the
    stack's database only through psycopg and a subprocess of the stack's own."""
    url = own_postgres.create_database("emg")
    # A namespace of its own: Prefect's idempotency keys name request ids, which start again at 1
    # in this database, and the Prefect server is the session's.
    own = make_stack(
        "postgres-restarted", database_url=url, EMG_INSTANCE_NAMESPACE=f"pytest-{settings.TEST_SESSION}-own-postgres"
    )
    # Held jobs stay PENDING for as long as the test needs, without holding the node from others.
    hold = own.faults.add_args("sbatch", ["--hold"], match=ASSEMBLY)
    own.stack.beat.start()
    saved = subprocess.run(
        [sys.executable, "-c", SAVE_REQUESTS, *BACKLOG],
        env=own.stack.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    request_ids = [int(i) for i in saved.stdout.split()]
    request_table, job_table, wait_table = (
        AnalysisRequest._meta.db_table,
        ClusterJob._meta.db_table,
        JobWait._meta.db_table,
    )

    def pending_and_suspended() -> list[tuple[str, str]] | None:
        found = rows(
            url,
            f"SELECT j.slurm_job_id, j.state, r.flow_run_id FROM {request_table} r "
            f"JOIN {wait_table} w ON w.request_id = r.id AND w.step = 'assembly' "
            f"JOIN {job_table} j ON j.id = w.job_id WHERE r.id = ANY(%s)",
            [request_ids],
        )
        ready = len(found) == len(request_ids) and all(
            state == "PENDING" and state_names(flow_run_id)[-1] == "Suspended" for _, state, flow_run_id in found
        )
        return found if ready else None

    held = wait_until(
        pending_and_suspended,
        timeout=150,
        interval=1,
        message="every request's assembly job is pending in Slurm and its flow suspended",
    )
    restarted_at = datetime.now(UTC)
    own_postgres.restart()
    tick_table = ReconcileTick._meta.db_table
    wait_until(
        lambda: rows(
            url, f"SELECT 1 FROM {tick_table} WHERE started_at > %s AND finished_at IS NOT NULL", [restarted_at]
        ),
        timeout=60,
        interval=0.5,
        message="a tick finished after the restart",
    )
    # Our hold ends, as a full queue would drain: the jobs run.
    own.faults.remove(hold)
    subprocess.run(["scontrol", "release", ",".join(sorted({job_id for job_id, _, _ in held}))], check=True, timeout=30)

    def statuses() -> dict[int, tuple[str, str]] | None:
        found = {
            i: (status, reason)
            for i, status, reason in rows(
                url, f"SELECT id, status, status_reason FROM {request_table} WHERE id = ANY(%s)", [request_ids]
            )
        }
        return found if all(status in AnalysisRequest.FINAL_STATUSES for status, _ in found.values()) else None

    try:
        finished = wait_until(statuses, timeout=COMPLETION_DEADLINE, interval=1, message="every request finished")
    except AssertionError:
        print(own.logs())
        raise
    assert finished == {i: (COMPLETED, reason) for i, (_, reason) in finished.items()}
    jobs = [
        ClusterJob(
            id=i, name=name, fingerprint=fingerprint, attempts=attempts, history=history, slurm_job_id=slurm_job_id
        )
        for i, name, fingerprint, attempts, history, slurm_job_id in rows(
            url, f"SELECT id, name, fingerprint, attempts, history, slurm_job_id FROM {job_table}"
        )
    ]
    assert {job.name.split("-")[1] for job in jobs} == {"assembly", "analysis", "datamove"}
    assert_exactly_once_in_slurm(jobs)


# --- a job Slurm rejects ---------------------------------------------------------------------

GOOD_STUDIES = ["PRJEB40001", "PRJEB40500", "PRJEB40001", "PRJEB40500"]
# It assembles as well as any other; only its partition will be wrong. Not the slow-ENA study: the
# session's cached fetch of that one would take away the Running window test_resilience.py needs.
BAD_STUDY = "PRJEB40002"


def test_a_job_slurm_rejects_fails_only_its_request_with_slurms_words_within_three_ticks(make_stack):
    """One request's job asks Slurm for a partition that does not exist; the other four requests
    COMPLETE, and the bad one ends FAILED with Slurm's own message, its job given up within 3 ticks
    of its submission rather than submitted again and again.

    The partition is a setting of the runner (EMG_SLURM_PARTITION), the same for every request;
    so the shim adds `--partition=nope` to the sbatch of that one request's assembly job (matched
    on its study in the job name), and the real sbatch rejects a real invalid partition."""
    own = make_stack("invalid-partition")
    own.faults.add_args("sbatch", ["--partition=nope"], match=f"{ASSEMBLY}{BAD_STUDY}")
    own.stack.beat.start()

    requests = [new_request(study) for study in GOOD_STUDIES[:2] + [BAD_STUDY] + GOOD_STUDIES[2:]]
    bad = requests[2]

    def rejected_calls() -> list[dict]:
        return [c for c in own.faults.calls("sbatch") if BAD_STUDY in " ".join(c["argv"]) and c["outcome"]]

    [first, *_] = wait_until(rejected_calls, timeout=120, interval=0.2, message="the bad job's sbatch answered")
    assert first["exit_code"] != 0 and "invalid partition" in first["stderr"].lower()
    job = wait_until(
        lambda: (job := jobs_of(bad)["assembly"]).is_final and job,
        timeout=60,
        interval=0.2,
        message="the rejected job ended",
    )
    given_up_at = job.ended_at or timezone.now()
    ticks = ReconcileTick.objects.filter(
        started_at__gt=datetime.fromtimestamp(first["time"], UTC), started_at__lte=given_up_at
    ).count()
    assert ticks <= 3, f"{ticks} ticks between the rejected submission and the job's end"

    finished = all_final(requests, own, timeout=COMPLETION_DEADLINE)
    bad = finished.pop(2)
    assert bad.status == AnalysisRequest.Status.FAILED
    assert "invalid partition" in bad.status_reason.lower(), bad.status_reason
    assert_completed(finished)
    print(f"sbatch calls for the bad job: {len(rejected_calls())}")
    assert_exactly_once_in_slurm(own.jobs())
