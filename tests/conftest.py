import os
import shutil
import subprocess
from pathlib import Path

import pytest
from django.conf import settings

from devstack.ena_fake import FakeEnaServer
from devstack.processes import ROOT
from devstack.services import (
    prefect_database_url,
    recreate_postgres_database,
    start_prefect_server,
    start_redis,
)
from devstack.stack import Stack

PREFECT_TEST_DATABASE = f"emg_prefect_{settings.TEST_SESSION}"


@pytest.fixture(scope="session")
def service_logs() -> Path:
    """Service logs land where CI and people can read them after a failure."""
    logs = ROOT / "test-artifacts" / "logs" / settings.TEST_SESSION
    logs.mkdir(parents=True, exist_ok=True)
    return logs


@pytest.fixture(scope="session", autouse=True)
def redis_server(service_logs):
    """This session's own Redis, on the port tests/settings.py chose, keeping nothing on disk."""
    import redis

    server = start_redis(redis.connection.parse_url(settings.REDIS_URL)["port"], service_logs, dict(os.environ))
    yield settings.REDIS_URL
    server.stop()


@pytest.fixture(scope="session")
def prefect_api_url(service_logs):
    """A real Prefect server of this session's own, on PostgreSQL (SQLite locks up under concurrency)."""
    recreate_postgres_database(PREFECT_TEST_DATABASE)
    env = {**os.environ, "PREFECT_SERVER_DATABASE_CONNECTION_URL": prefect_database_url(PREFECT_TEST_DATABASE)}
    server = start_prefect_server(env, service_logs, os.environ["PREFECT_API_URL"])
    yield os.environ["PREFECT_API_URL"]
    server.stop()
    recreate_postgres_database(PREFECT_TEST_DATABASE, create=False)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The project's single-node Slurm cluster, started by scripts/slurm-up.sh if it is not up."""
    up = shutil.which("sinfo") and subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    if not up:
        subprocess.run(["bash", str(ROOT / "scripts" / "slurm-up.sh")], check=True, timeout=600)
    return "slurm"


@pytest.fixture(scope="session")
def cluster_backend_env(slurm_cluster, tmp_path_factory):
    """What the stack's processes need for the backend of the real cluster under test:
    EMG_TEST_CLUSTER_BACKEND=slurm (Slurm's commands, the default) or slurmrestd (its REST API, with
    a token file, and every Slurm command on the processes' PATH a stand-in that fails and says so)."""
    from tests.slurm import SLURMRESTD_URL, slurm_command_stand_ins, test_cluster_backend, write_token_file

    if test_cluster_backend() == "slurm":
        yield {"EMG_CLUSTER_BACKEND": "slurm"}
        return
    directory = tmp_path_factory.mktemp("slurmrestd")
    token_file = write_token_file(directory)
    stand_ins, called = slurm_command_stand_ins(directory)
    yield {
        "EMG_CLUSTER_BACKEND": "slurmrestd",
        "EMG_SLURMRESTD_URL": SLURMRESTD_URL,
        "EMG_SLURMRESTD_TOKEN_FILE": str(token_file),
        "PATH": f"{stand_ins}:{os.environ['PATH']}",
    }
    if called.exists():
        pytest.fail(f"the stack ran Slurm commands on the slurmrestd backend:\n{called.read_text()}")


@pytest.fixture(scope="session")
def ena_server():
    """Our local fake of the ENA Portal API, serving recorded studies and their reads."""
    server = FakeEnaServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack(django_db_setup, prefect_api_url, cluster_backend_env, ena_server, service_logs, tmp_path_factory):
    """Prefect runner, Celery dispatch worker, tick worker and beat (devstack.Stack), all on the test
    database, on the product's settings and a product of the tests' own (tests/product_settings.py)."""
    database = settings.DATABASES["default"]
    env = dict(os.environ)
    env.update(
        # The product's and a product of the tests' own (tests.triggerapp), importable from the
        # checkout also by the processes started from the venv's scripts (celery).
        DJANGO_SETTINGS_MODULE="tests.product_settings",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        DATABASE_URL=f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}",
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        **cluster_backend_env,
        EMG_ENA_PORTAL_API=ena_server.base_url,
        EMG_ENA_FASTQ_URL_PREFIX=ena_server.fastq_url_prefix,
        EMG_ENA_RETRY_DELAY_SECONDS="1",
        # Deferrals after a first fetch's retries meet an outage: seconds here, minutes in production.
        EMG_ENA_DEFER_SECONDS="2",
        EMG_ENA_DEFER_MAX_SECONDS="4",
        EMG_ENA_MAX_DEFERRALS="2",
        EMG_RESULTS_DIR=str(tmp_path_factory.mktemp("results")),
    )
    session_stack = Stack(env, service_logs, label="e2e")
    try:
        session_stack.start()
        yield session_stack
    finally:
        session_stack.stop()


@pytest.fixture(scope="module")
def local_stack(stack, service_logs):
    """The session stack's twin with its cluster jobs run as local processes (EMG_CLUSTER_BACKEND=local)
    instead of on Slurm, on the same database, broker and Prefect server: the session stack is
    paused meanwhile, so the twin's workers and reconciler are the only ones. For a flow's test that
    needs no cluster (tests/flowkit.py)."""
    env = {**stack.env, "EMG_CLUSTER_BACKEND": "local"}
    for name in ("EMG_SLURMRESTD_URL", "EMG_SLURMRESTD_TOKEN_FILE"):
        env.pop(name, None)
    with stack.paused():
        twin = Stack(env, service_logs, label="local")
        try:
            twin.start()
            yield twin
        finally:
            twin.stop()


def pytest_collection_modifyitems(items):
    """The chaos suite runs last: it kills slurmctld and other shared services, and a test right after
    it would otherwise meet a cluster still settling. The order of the others is kept."""
    items.sort(key=lambda item: item.get_closest_marker("chaos") is not None)
