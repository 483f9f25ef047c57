"""The runner's lease keeper sees the processes Prefect's Runner holds, stopped ones included.

It reads the Runner's process manager, which Prefect does not document: this fails if an upgrade
moves it, rather than every live run silently losing its lease.
"""

import asyncio
import os
import signal
import subprocess
import uuid

import pytest
from prefect.runner import Runner
from prefect.runner._process_manager import ProcessHandle

from emg.models import FlowRunLease
from flows.serve import LeaseKeeper, live_processes

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_stopped_process_is_live_and_leased_and_an_ended_one_is_released():
    runner = Runner(limit=2)
    flow_run_id = uuid.uuid4()
    child = subprocess.Popen(["sleep", "120"])
    try:
        asyncio.run(runner._process_manager.add(flow_run_id, ProcessHandle(child)))
        keeper = LeaseKeeper(runner, every=1, host="test-host")
        os.kill(child.pid, signal.SIGSTOP)
        assert live_processes(runner) == {flow_run_id: child.pid}
        keeper.renew_once()
        assert FlowRunLease.objects.filter(flow_run_id=flow_run_id, host="test-host", pid=child.pid).exists()
    finally:
        child.kill()
        child.wait()
    assert live_processes(runner) == {}
    keeper.renew_once()
    # Only this keeper's lease: the session stack's runner, if it runs, holds leases of its own.
    assert not FlowRunLease.objects.filter(host="test-host").exists()


def test_the_runner_limit_reaches_prefects_runner(settings):
    assert Runner(limit=settings.EMG_RUNNER_LIMIT).limit == settings.EMG_RUNNER_LIMIT
