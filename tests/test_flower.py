"""Flower, the Celery side's dashboard, answers only with the basic-auth credentials it was given."""

import os
import secrets

import httpx
import pytest

from devstack.processes import ManagedProcess, venv_script, wait_until
from devstack.services import free_port

FLOWER_USER = "operator"


def start_flower(env: dict[str, str], log_dir, basic_auth: str) -> tuple[ManagedProcess, str]:
    """A real Flower on a free port, on the broker the environment names; returns it and its URL."""
    port = free_port()
    flower = ManagedProcess(
        "flower", [venv_script("celery"), "-A", "workers", "flower", f"--port={port}", "--address=127.0.0.1"],
        env={**env, "FLOWER_BASIC_AUTH": basic_auth}, log_dir=log_dir,
    ).start()
    url = f"http://127.0.0.1:{port}/"

    def answers() -> bool:
        if not flower.running:
            raise RuntimeError(f"Flower exited:\n{flower.log_tail()}")
        return httpx.get(url, timeout=2).status_code in (200, 401)

    wait_until(answers, timeout=60, interval=0.5, message="Flower answers")
    return flower, url


@pytest.fixture(scope="module")
def flower(service_logs):
    password = secrets.token_urlsafe(12)
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "emg.settings"}
    process, url = start_flower(env, service_logs, f"{FLOWER_USER}:{password}")
    yield url, password
    process.stop()


def test_flower_refuses_a_visitor_without_credentials(flower):
    url, _ = flower
    response = httpx.get(url, timeout=5)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")


def test_flower_refuses_a_wrong_password(flower):
    url, password = flower
    assert httpx.get(url, auth=(FLOWER_USER, password + "x"), timeout=5).status_code == 401


def test_flower_shows_its_dashboard_with_the_credentials(flower):
    url, password = flower
    response = httpx.get(url, auth=(FLOWER_USER, password), timeout=5)
    assert response.status_code == 200
    assert "Flower" in response.text and "Workers" in response.text
