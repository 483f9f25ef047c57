"""The dev stack's own promises, on real processes: what a liveness probe does for a frozen worker."""

import os
import signal

import pytest

from devstack.services import free_port, start_redis
from devstack.stack import Stack, worker_answers

pytestmark = pytest.mark.django_db


@pytest.fixture
def lone_worker(service_logs):
    """A stack of our own, on a Redis of its own, of which only the dispatch worker runs."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "emg.settings", "REDIS_URL": url, "CELERY_BROKER_URL": url}
    redis = start_redis(port, service_logs, env, "devstack-redis")
    stack = Stack(env, service_logs, label="devstack", runner=False)
    try:
        stack.worker.start()
        stack.wait_for_worker()
        yield stack
    finally:
        stack.worker.stop()
        redis.stop()


def test_a_worker_that_answers_is_left_running(lone_worker):
    pid = lone_worker.worker.process.pid
    assert lone_worker.revive_if_unresponsive(after=10) is None
    assert lone_worker.worker.process.pid == pid


def test_a_frozen_worker_is_killed_and_started_again_with_its_log_on_the_record(lone_worker):
    frozen = lone_worker.worker.process
    os.killpg(frozen.pid, signal.SIGSTOP)
    try:
        reason = lone_worker.revive_if_unresponsive(after=3)
    finally:
        if frozen.poll() is None:  # a revive that failed leaves it stopped: do not leak it
            os.killpg(frozen.pid, signal.SIGKILL)
    assert reason is not None and "answers pings" in reason and "its last lines" in reason
    assert frozen.poll() is not None, "the frozen process was not killed"
    assert lone_worker.worker.process.pid != frozen.pid
    assert worker_answers(lone_worker.env, lone_worker.worker_name, "devstack")
