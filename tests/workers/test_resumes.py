"""The reconciler resumes suspended flow runs gently, and never leaves one waiting forever.

Real Slurm jobs and real flow runs on the session's Prefect server; the flow runs are moved
through the states a waiting flow goes through (tests/workers/flow_runs.py), the test drives the ticks.
"""

import http.server
import threading

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import StateType

from devstack.processes import wait_until
from emg.models import ClusterJob, ClusterJobState, JobWait
from flows.cluster_jobs import declare_job
from slurm_adapter import SubmittedJob
from tests.workers.flow_runs import await_job, new_flow_run, set_running, state_type, suspend
from tests.workers.ticking import RecordedLogs, job_ended, shell_job, tick_until
from workers.reconcile.flow_runs import tend_flow_runs
from workers.reconcile.resume_pace import ResumePace
from workers.reconciler import TickReport

pytestmark = [pytest.mark.slurm, pytest.mark.django_db(transaction=True)]

STORM = 50
RESUMES_PER_TICK = 10


def test_fifty_jobs_ending_in_one_tick_are_resumed_ten_per_tick_oldest_first_none_lost_none_logged(
    make_reconciler, prefect, cluster, work_dir
):
    go = work_dir / "go"
    # Every job waits for the same file, so all fifty end within a moment of each other.
    jobs = [
        declare_job(
            shell_job(f"storm-{n}", f"while [ ! -e {go} ]; do sleep 0.2; done; echo {n}", work_dir, memory_mb=20)
        )
        for n in range(STORM)
    ]
    runs = [new_flow_run(prefect) for _ in jobs]
    for run, job in zip(runs, jobs):
        await_job(run, job)
    reconciler = make_reconciler(resumes_per_tick=RESUMES_PER_TICK)
    tick_until(
        reconciler,
        lambda: ClusterJob.objects.filter(state=ClusterJobState.RUNNING).count() == STORM,
        timeout=180,
        message="all fifty jobs running",
    )
    for run in runs:
        suspend(prefect, run, key="jobs-wait-1")

    go.touch()
    submitted = [
        SubmittedJob(job.slurm_job_id, job.submit_time, job.log_path) for job in ClusterJob.objects.order_by("id")
    ]
    wait_until(
        lambda: all(status.state.is_final for status in cluster.query(submitted).values()),
        timeout=60,
        interval=0.5,
        message="Slurm has all fifty jobs ended",
    )
    with RecordedLogs("workers", "emg", "flows") as logs:
        reports = tick_until(
            reconciler,
            lambda: not JobWait.objects.filter(released_at__isnull=True).exists(),
            timeout=60,
            interval=0.2,
            message="every wait released",
        )

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


class StrugglingPrefect:
    """A proxy in front of the session's Prefect server that, while `refusing`, answers every resume
    with a 503, as an overloaded server (or the load balancer before it) does; the rest passes through."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.refusing = False
        self.resumes_seen = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.removeprefix("/api")
                if path.endswith("/resume"):
                    proxy.resumes_seen += 1
                    if proxy.refusing:
                        self.send_response(503)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                answer = httpx.request(
                    self.command,
                    f"{proxy.upstream}{path}",
                    content=body,
                    timeout=30,
                    headers={"Content-Type": self.headers.get("Content-Type", "application/json")},
                )
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_resumes_per_tick_grow_while_prefect_accepts_them_and_halve_when_it_refuses(
    make_reconciler, prefect, prefect_api_url, work_dir
):
    runs = [new_flow_run(prefect) for _ in range(40)]
    for n, run in enumerate(runs):
        await_job(run, job_in(work_dir, n, ClusterJobState.COMPLETED))
        suspend(prefect, run, key="jobs-wait-1")

    with StrugglingPrefect(prefect_api_url) as struggling, SyncPrefectClient(struggling.url) as through_proxy:
        pace = ResumePace(2, ceiling=64, concurrency=4)
        reconciler = make_reconciler(resume_pace=pace)
        reconciler.prefect = through_proxy
        growing = [len(reconciler.tick().resumed) for _ in range(3)]
        assert growing == [2, 4, 8] and pace.budget == 16

        struggling.refusing = True
        seen = struggling.resumes_seen
        refused = reconciler.tick()
        assert refused.resumed == [] and not refused.errors
        assert pace.budget == 8
        assert struggling.resumes_seen - seen <= 4  # it stopped asking once refused: one call per thread at most

        struggling.refusing = False
        reports = tick_until(
            reconciler,
            lambda: not JobWait.objects.filter(released_at__isnull=True).exists(),
            timeout=60,
            message="every wait released once Prefect accepts again",
        )
    assert [len(report.resumed) for report in reports] == [8, 16, 2]
    resumed = [run for report in reports for run in report.resumed]
    assert len(set(resumed)) == len(resumed) == len(runs) - sum(growing)
    assert {state_type(prefect, run) for run in runs} == {StateType.SCHEDULED}


def test_resumes_that_prefect_answers_slowly_stop_the_budget_growing_and_very_slow_ones_halve_it():
    pace = ResumePace(40, ceiling=1000, target_seconds=10)
    pace.settle(issued=40, throttled=False, seconds=12)
    assert pace.budget == 40  # at the server's limit: held
    pace.settle(issued=40, throttled=False, seconds=25)
    assert pace.budget == 20
    pace.settle(issued=20, throttled=False, seconds=3)
    assert pace.budget == 40
    pace.settle(issued=7, throttled=False, seconds=1)
    assert pace.budget == 40  # fewer were ready than it allowed: nothing learnt


class RecordingPrefect:
    """The session's Prefect client, with the flow runs each read brought back counted."""

    def __init__(self, client: SyncPrefectClient):
        self.client = client
        self.runs_read = 0
        self.counts = 0

    def read_flow_runs(self, **kwargs):
        runs = self.client.read_flow_runs(**kwargs)
        self.runs_read += len(runs)
        return runs

    def count_flow_runs(self, **kwargs):
        self.counts += 1
        return self.client.count_flow_runs(**kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


def job_in(work_dir, n: int, state: str) -> ClusterJob:
    """A job of its own (its command differs: a name alone is not a job's identity) in `state`."""
    job = declare_job(shell_job(f"{state.lower()}-{n}", f"echo {n}", work_dir))
    ClusterJob.objects.filter(id=job.id).update(state=state, slurm_job_id=str(810000 + n))
    return job


def test_a_tick_reads_from_prefect_only_the_runs_it_may_resume_and_counts_the_waiting_rest(
    make_reconciler, prefect, work_dir
):
    waiting = [new_flow_run(prefect) for _ in range(30)]
    ready = [new_flow_run(prefect) for _ in range(2)]
    for n, run in enumerate(waiting):
        await_job(run, job_in(work_dir, n, ClusterJobState.RUNNING))
    for n, run in enumerate(ready, start=100):
        await_job(run, job_in(work_dir, n, ClusterJobState.COMPLETED))
    for run in waiting + ready:
        suspend(prefect, run, key="jobs-wait-1")
    reconciler = make_reconciler()
    recording = reconciler.prefect = RecordingPrefect(prefect)

    report = TickReport()
    tend_flow_runs(reconciler, report)

    assert sorted(report.resumed, key=str) == sorted(ready, key=str) and not report.errors
    assert recording.runs_read == len(ready)  # none of the thirty waiting runs was read
    assert recording.counts == 1
    assert JobWait.objects.filter(flow_run_id__in=waiting, released_at__isnull=True).count() == len(waiting)

    # A waiting run deleted from Prefect: the count falls short, and the waiting runs are read whole.
    prefect.delete_flow_run(waiting[0])
    report = TickReport()
    tend_flow_runs(reconciler, report)
    assert recording.runs_read == len(ready) + len(waiting) - 1 and not report.errors
    assert JobWait.objects.get(flow_run_id=waiting[0]).released_at is not None  # its run is gone
    assert JobWait.objects.filter(flow_run_id__in=waiting[1:], released_at__isnull=True).count() == len(waiting) - 1
