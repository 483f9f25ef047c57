"""Flower, the Celery side's dashboard, answers only with the basic-auth credentials it was given."""

import os
import secrets

import httpx
import pytest

from devstack.stack import start_flower

FLOWER_USER = "operator"


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
