"""Environments for processes the tests start on this session's services."""

import os

from django.conf import settings


def database_url() -> str:
    """The test database (pytest-django renames it at setup), for processes outside pytest."""
    database = settings.DATABASES["default"]
    return f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"


def django_process_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DJANGO_SETTINGS_MODULE="emg.settings", DATABASE_URL=database_url(), **overrides)
    return env
