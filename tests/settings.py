"""Settings for the test session: real PostgreSQL and Redis, a private Prefect server.

Defaults are put into the environment (not only into Django settings) because the
processes the tests start (Prefect server and runner, Celery worker and beat) read them
from there. Anything already set in the environment wins.
"""

import os
import secrets
import tempfile
import uuid

from devstack.services import free_port

_session = uuid.uuid4().hex[:8]
# Everything is named per session, so two test sessions on one machine never share a queue,
# a database or a Prefect server.
TEST_SESSION = _session
_defaults = {
    "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/emg_{_session}",
    # A Redis of this session's own (tests/conftest.py starts it), so a stack never consumes
    # another session's events and restarting it touches nothing else.
    "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    "EMG_INSTANCE_NAMESPACE": f"pytest-{_session}",
    "EMG_WORK_DIR": tempfile.mkdtemp(prefix=f"emg-test-{_session}-"),
    "EMG_RECONCILE_INTERVAL_SECONDS": "1",
    "EMG_OUTBOX_GRACE_SECONDS": "5",
    "EMG_OUTBOX_SWEEP_SECONDS": "2",
    "EMG_SLURM_ACCOUNTING_GRACE_SECONDS": "30",
    "EMG_MAX_SUBMISSIONS_PER_MINUTE": "600",
    "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",
    "PREFECT_HOME": tempfile.mkdtemp(prefix=f"emg-test-prefect-{_session}-"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
    # Production's defaults (DEBUG off, so a key of the session's own), but over plain HTTP: the
    # session stack serves localhost without TLS. tests/test_security.py checks the HTTPS defaults.
    "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
    "DJANGO_HTTPS": "0",
}
for _name, _value in _defaults.items():
    os.environ.setdefault(_name, _value)
os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", os.path.join(os.environ["PREFECT_HOME"], "results"))

from tests.product_settings import *  # noqa: E402,F403
