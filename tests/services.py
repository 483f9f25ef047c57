"""Environments for processes the tests start on this session's services."""

import os
from contextlib import contextmanager

from django.conf import settings
from django.test import override_settings

from devstack.services import free_port
from emg.outbox import _producer


def database_url() -> str:
    """The test database (pytest-django renames it at setup), for processes outside pytest."""
    database = settings.DATABASES["default"]
    return f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"


def django_process_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DJANGO_SETTINGS_MODULE="emg.settings", DATABASE_URL=database_url(), **overrides)
    return env


@contextmanager
def broker_at(url: str, **also: str):
    """The test process publishes its events (emg.outbox) to `url`, through a producer made for it."""
    with override_settings(CELERY_BROKER_URL=url, **also):
        _producer.cache_clear()
        try:
            yield
        finally:
            _producer.cache_clear()


@contextmanager
def broker_unreachable():
    """Publishing fails as if Redis were down, for the test process only: events stay in the outbox."""
    with broker_at(f"redis://127.0.0.1:{free_port()}/0"):
        yield
