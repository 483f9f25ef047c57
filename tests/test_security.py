"""Secure by default: debug mode off unless asked for, no start without a secret key of one's own,
HTTPS settings for the usual TLS-terminating proxy, static files served with DEBUG off, and error
reports that mask connection URLs. `check --deploy` is clean for the compose environment."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from django.test import Client, RequestFactory

from emg.error_reports import ConnectionUrlsMasked

ROOT = Path(__file__).resolve().parent.parent
SECRET = "a-test-secret-key-of-fifty-characters-or-more-0123456789abcdef"

# Variables of the developer's or the session's environment that would decide what is tested.
DECIDING = re.compile(r"^(DJANGO_|DATABASE_URL$)")


def run_django(code: str, **env: str) -> subprocess.CompletedProcess:
    """Python in a fresh process on emg.settings, with only the given Django variables set."""
    clean = {name: value for name, value in os.environ.items() if not DECIDING.match(name)}
    return subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); from django.conf import settings; {code}"],
        cwd=ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": "emg.settings", "DATABASE_URL": "sqlite://:memory:", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_without_a_secret_key_every_process_refuses_to_start_unless_in_debug_mode():
    refused = run_django("print('started')")
    assert refused.returncode != 0 and "started" not in refused.stdout
    assert "DJANGO_SECRET_KEY is not set" in refused.stderr

    demo = run_django("print(settings.DEBUG)", DJANGO_DEBUG="1")
    assert demo.returncode == 0, demo.stderr
    assert demo.stdout.strip() == "True"


def test_debug_mode_is_off_and_https_on_unless_asked_otherwise():
    result = run_django(
        "print(settings.DEBUG, settings.SECURE_SSL_REDIRECT, settings.SESSION_COOKIE_SECURE, "
        "settings.CSRF_COOKIE_SECURE, settings.SECURE_HSTS_SECONDS > 0)",
        DJANGO_SECRET_KEY=SECRET,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "True", "True", "True"]


def test_the_proxy_header_and_trusted_origins_are_set_from_the_environment():
    result = run_django(
        "print(settings.SECURE_PROXY_SSL_HEADER, settings.CSRF_TRUSTED_ORIGINS)",
        DJANGO_SECRET_KEY=SECRET,
        DJANGO_SECURE_PROXY_SSL_HEADER="1",
        DJANGO_CSRF_TRUSTED_ORIGINS="https://emg.example.org, https://emg-admin.example.org",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "('HTTP_X_FORWARDED_PROTO', 'https') ['https://emg.example.org', 'https://emg-admin.example.org']"
    )


@pytest.mark.django_db
def test_over_https_plain_http_is_redirected_except_the_probes_and_a_proxied_https_request_is_served(settings):
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    client = Client()  # its handler loads the middleware, with these settings, on its first request

    redirected = client.get("/admin/login/")
    assert redirected.status_code == 301 and redirected["Location"].startswith("https://")
    assert client.get("/health", {"check": "database"}).status_code == 200
    assert client.get("/admin/login/", headers={"X-Forwarded-Proto": "https"}).status_code == 200


@pytest.mark.django_db
def test_the_admin_has_its_static_files_with_debug_off(settings):
    settings.DEBUG = False
    response = Client().get("/static/admin/css/base.css")
    assert response.status_code == 200
    assert b"".join(response.streaming_content).strip(), "an empty stylesheet"


def test_error_reports_mask_connection_urls_and_passwords():
    request = RequestFactory().get("/", DATABASE_URL="postgres://emg:hunter2@db/emg", REDIS_URL="redis://:pw@r/0")
    masked = ConnectionUrlsMasked()
    meta = masked.get_safe_request_meta(request)
    assert "hunter2" not in str(meta["DATABASE_URL"]) and "pw@" not in str(meta["REDIS_URL"])
    safe = masked.get_safe_settings()
    assert "hunter2" not in str(safe)


def compose_app_environment() -> dict[str, str]:
    """compose.yaml's environment of the app services, with the values a deployment supplies."""
    supplied = {
        "POSTGRES_PASSWORD": "a-postgres-password",
        "REDIS_PASSWORD": "a-redis-password",
        "PREFECT_API_AUTH_STRING": "user:a-prefect-password",
        "DJANGO_SECRET_KEY": SECRET,
    }
    document = yaml.safe_load((ROOT / "compose.yaml").read_text())

    def resolve(value: str) -> str:
        # ${NAME}, ${NAME:?message} (required) and ${NAME:-default}, as compose resolves them.
        def one(match: re.Match) -> str:
            name, operator, rest = match.group(1), match.group(2), match.group(3)
            if name in supplied:
                return supplied[name]
            if operator == ":?":
                raise AssertionError(f"compose requires {name}, which this test does not supply")
            return rest if operator == ":-" else ""

        return re.sub(r"\$\{(\w+)(:[?-])?([^}]*)\}", one, str(value))

    return {name: resolve(value) for name, value in document["x-app-env"].items()}


def test_check_deploy_is_clean_for_the_compose_environment():
    env = compose_app_environment()
    assert env["DJANGO_DEBUG"] == "0"
    clean = {name: value for name, value in os.environ.items() if not DECIDING.match(name)}
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env={**clean, **env, "DJANGO_SETTINGS_MODULE": "emg.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout
