"""`/health` against the real services, and against a Redis that goes away: liveness for anyone from
cached results, details for operators, and bounded however many call and however long a check hangs."""

import shutil
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from django.test import Client, override_settings

from devstack.processes import ManagedProcess, wait_until
from devstack.services import free_port
from emg import views

pytestmark = [pytest.mark.slurm, pytest.mark.django_db]

TOKEN = "health-test-token-" + uuid.uuid4().hex


@pytest.fixture(autouse=True)
def monitoring_token(settings):
    settings.EMG_MONITORING_TOKEN = TOKEN


def detail(client, **query):
    return client.get("/health/detail", query, headers={"Authorization": f"Bearer {TOKEN}"})


@pytest.fixture
def live_services(prefect_api_url, slurm_cluster):
    """The real database, Redis, Prefect API and Slurm cluster this session tests against."""


@pytest.fixture
def own_redis(service_logs):
    port = free_port()
    server = ManagedProcess(
        "redis-health",
        [shutil.which("redis-server"), "--port", str(port), "--save", "", "--appendonly", "no"],
        env={},
        log_dir=service_logs,
    ).start()
    url = f"redis://127.0.0.1:{port}/0"
    wait_until(lambda: redis.Redis.from_url(url).ping(), timeout=10, message="our Redis answers")
    yield server, url
    server.stop()


def test_healthy_when_database_redis_prefect_and_slurm_answer(client, live_services, settings):
    settings.EMG_CLUSTER_BACKEND = "slurm"
    response = client.get("/health")

    body = response.json()
    assert response.status_code == 200, body
    assert body == {"status": "ok", "checks": {"database": "ok", "redis": "ok", "prefect": "ok", "slurm": "ok"}}
    checks = detail(client).json()["checks"]
    assert set(checks) == {"database", "redis", "prefect", "slurm"}
    for check in checks.values():
        assert check["status"] == "ok" and check["latency_ms"] >= 0


def test_the_detailed_view_is_for_staff_or_the_monitoring_token(client, admin_client, live_services):
    assert client.get("/health/detail").status_code == 401
    assert client.get("/health/detail", headers={"Authorization": "Bearer not-it"}).status_code == 401
    assert detail(client).status_code == 200
    assert admin_client.get("/health/detail").status_code == 200


def test_unhealthy_with_redis_error_once_redis_stops(client, live_services, own_redis, settings):
    settings.EMG_HEALTH_CACHE_SECONDS = 0.5
    server, url = own_redis
    with override_settings(REDIS_URL=url):
        assert client.get("/health").status_code == 200
        server.stop()

        started = time.monotonic()
        # Within the cache's age, the last answer stands; then the check runs again and fails.
        wait_until(
            lambda: client.get("/health").status_code == 503, timeout=5, interval=0.1, message="/health saw Redis stop"
        )
        response = client.get("/health")
        detailed = detail(client)

    body = response.json()
    assert body["status"] == "error" and body["checks"]["redis"] == "error"
    assert "Connection" not in response.content.decode()  # the public answer has no error text
    checks = detailed.json()["checks"]
    assert checks["redis"]["status"] == "error" and "Connection" in checks["redis"]["error"]
    assert {name for name, check in checks.items() if check["status"] == "ok"} >= {"database", "prefect"}
    assert time.monotonic() - started < 5


def test_unreachable_prefect_answers_quickly_names_no_host_and_masks_credentials(client, live_services):
    with override_settings(
        PREFECT_API_URL=f"http://operator:hunter2secret@prefect-internal.invalid:{free_port()}/api",
        EMG_CLUSTER_BACKEND="local",
    ):
        started = time.monotonic()
        response = client.get("/health")
        detailed = detail(client)

    assert response.status_code == 503
    assert response.json()["checks"]["prefect"] == "error"
    assert "slurm" not in response.json()["checks"]
    assert "prefect-internal" not in response.content.decode()
    assert detailed.json()["checks"]["prefect"]["status"] == "error"
    assert "hunter2secret" not in detailed.content.decode()
    assert time.monotonic() - started < 5


def test_a_healthcheck_can_ask_for_only_the_checks_it_needs(client, live_services, own_redis):
    server, url = own_redis
    with override_settings(REDIS_URL=url):
        server.stop()  # a dependency the caller does not ask about
        response = client.get("/health", {"check": ["database"]})
        both = client.get("/health", {"check": ["database", "redis"]})
        unknown = client.get("/health", {"check": ["databse"]})

    assert response.status_code == 200, response.json()
    assert set(response.json()["checks"]) == {"database"}
    assert both.status_code == 503
    assert unknown.status_code == 400 and "databse" in unknown.json()["error"]


def test_a_job_whose_slurm_state_we_cannot_read_is_an_alert_not_an_outage(client, live_services, settings, tmp_path):
    from django.utils import timezone

    from emg.models import ClusterJob, ClusterJobState

    settings.EMG_CLUSTER_BACKEND = "slurm"
    job = ClusterJob.objects.create(
        name="odd-state",
        fingerprint="f" * 64,
        spec={"work_dir": str(tmp_path)},
        state=ClusterJobState.RUNNING,
        slurm_job_id="4242",
        attempts=1,
        unreadable_state="EXPEDITING",
        unreadable_since=timezone.now(),
    )

    assert "alerts" not in client.get("/health").json()
    body = detail(client).json()

    assert body["status"] == "ok"
    assert body["alerts"]["unreadable_jobs"] == [
        {"job": job.id, "slurm_job_id": "4242", "state": "EXPEDITING", "since": job.unreadable_since.isoformat()}
    ]


def test_slurmrestd_backend_is_checked_with_its_token_and_a_refused_one_is_an_error(
    client, live_services, settings, tmp_path, monkeypatch
):
    from tests.slurm import SLURMRESTD_URL, mint_token

    token_file = tmp_path / "jwt"
    token_file.write_text(mint_token())
    settings.EMG_CLUSTER_BACKEND = "slurmrestd"
    settings.EMG_SLURMRESTD_URL = SLURMRESTD_URL
    settings.EMG_SLURMRESTD_TOKEN_FILE = str(token_file)

    monkeypatch.setattr(views, "_cache", views.CheckCache())  # nothing cached by the tests before
    settings.EMG_HEALTH_CACHE_SECONDS = 0
    healthy = detail(client)
    assert healthy.status_code == 200, healthy.json()
    assert set(healthy.json()["checks"]) == {"database", "redis", "prefect", "slurmrestd"}

    token_file.write_text("SLURM_JWT=expired-or-wrong-token")
    refused = detail(client)
    assert refused.status_code == 503
    assert "token was refused" in refused.json()["checks"]["slurmrestd"]["error"]
    assert "expired-or-wrong-token" not in refused.content.decode()


def test_200_concurrent_calls_share_one_run_of_each_check_and_leave_no_thread_or_process(
    live_services, settings, monkeypatch
):
    settings.EMG_CLUSTER_BACKEND = "slurm"
    settings.EMG_HEALTH_CACHE_SECONDS = 60
    scontrol_runs = []
    real_run = views.subprocess.run

    def counted_run(argv, *args, **kwargs):
        scontrol_runs.append(argv)
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(views.subprocess, "run", counted_run)
    monkeypatch.setattr(views, "_cache", views.CheckCache())  # nothing cached by the tests before
    assert Client().get("/health").status_code == 200  # fills the cache (and starts the check threads)
    threads_before = {thread.ident for thread in threading.enumerate()}

    def timed_call(_) -> float:
        started = time.monotonic()
        assert Client().get("/health").status_code == 200
        return time.monotonic() - started

    with ThreadPoolExecutor(max_workers=50) as callers:
        list(callers.map(timed_call, range(200)))
    # Latency one call at a time: in-process callers share one interpreter (and its lock) with the
    # server, so concurrent ones on this shared two-core machine measure how Python and the machine
    # switch threads, not what /health costs. What concurrency must not do (start checks, threads
    # or processes per call) the burst above shows.
    latencies = sorted(timed_call(n) for n in range(200))

    assert len(scontrol_runs) == 1
    assert {thread.ident for thread in threading.enumerate()} <= threads_before
    assert statistics.quantiles(latencies, n=100)[98] < 0.05, latencies[-5:]


def test_a_hung_check_is_reported_after_the_deadline_and_never_started_twice(
    client, live_services, settings, monkeypatch
):
    settings.EMG_CLUSTER_BACKEND = "slurm"
    settings.EMG_HEALTH_CACHE_SECONDS = 0
    monkeypatch.setattr(views, "HEALTH_DEADLINE_SECONDS", 1)
    release = threading.Event()
    started = []

    def hangs() -> None:
        started.append(time.monotonic())
        assert release.wait(timeout=30), "the test never released the check"

    monkeypatch.setitem(views.CHECKS, "slurm", views.Check(hangs, lambda: f"hung-{id(release)}"))
    try:
        began = time.monotonic()
        first = client.get("/health", {"check": "slurm"})
        first_took = time.monotonic() - began
        began = time.monotonic()
        again = [client.get("/health", {"check": "slurm"}) for _ in range(5)]
        again_took = time.monotonic() - began

        assert first.status_code == 503 and first.json()["checks"]["slurm"] == "error"
        assert 1 <= first_took < 3
        assert all(r.status_code == 503 for r in again) and again_took < 1  # answered at once, not 5 more seconds
        assert len(started) == 1
        assert "still running" in detail(client, check="slurm").json()["checks"]["slurm"]["error"]
    finally:
        release.set()
    wait_until(
        lambda: client.get("/health", {"check": "slurm"}).status_code == 200,
        timeout=5,
        interval=0.1,
        message="the released check answered",
    )
