"""`/health` against the real services, and against a Redis that goes away."""

import shutil
import time

import pytest
import redis
from django.test import override_settings

from devstack.processes import ManagedProcess, wait_until
from devstack.services import free_port

pytestmark = [pytest.mark.slurm, pytest.mark.django_db]


@pytest.fixture
def live_services(prefect_api_url, slurm_cluster):
    """The real database, Redis, Prefect API and Slurm cluster this session tests against."""


@pytest.fixture
def own_redis(service_logs):
    port = free_port()
    server = ManagedProcess(
        "redis-health", [shutil.which("redis-server"), "--port", str(port), "--save", "", "--appendonly", "no"],
        env={}, log_dir=service_logs,
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
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "redis", "prefect", "slurm"}
    for check in body["checks"].values():
        assert check["status"] == "ok" and check["latency_ms"] >= 0


def test_unhealthy_with_redis_error_once_redis_stops(client, live_services, own_redis):
    server, url = own_redis
    with override_settings(REDIS_URL=url):
        assert client.get("/health").status_code == 200
        server.stop()

        started = time.monotonic()
        response = client.get("/health")

    body = response.json()
    assert response.status_code == 503
    assert body["status"] == "error"
    assert body["checks"]["redis"]["status"] == "error" and "Connection" in body["checks"]["redis"]["error"]
    assert {name for name, check in body["checks"].items() if check["status"] == "ok"} >= {"database", "prefect"}
    assert time.monotonic() - started < 5


def test_unreachable_prefect_answers_quickly_and_masks_credentials_in_errors(client, live_services):
    with override_settings(PREFECT_API_URL=f"http://operator:hunter2secret@127.0.0.1:{free_port()}/api",
                           EMG_CLUSTER_BACKEND="local"):
        started = time.monotonic()
        response = client.get("/health")

    body = response.json()
    assert response.status_code == 503
    assert body["checks"]["prefect"]["status"] == "error"
    assert "slurm" not in body["checks"]
    assert "hunter2secret" not in response.content.decode()
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
    job = ClusterJob.objects.create(name="odd-state", fingerprint="f" * 64, spec={"work_dir": str(tmp_path)},
                                    state=ClusterJobState.RUNNING, slurm_job_id="4242", attempts=1,
                                    unreadable_state="EXPEDITING", unreadable_since=timezone.now())

    body = client.get("/health").json()

    assert body["status"] == "ok"
    assert body["alerts"]["unreadable_jobs"] == [
        {"job": job.id, "slurm_job_id": "4242", "state": "EXPEDITING", "since": job.unreadable_since.isoformat()}]
