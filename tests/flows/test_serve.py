"""The runner serves the deployments routed to its group; its lease keeper sees the processes
Prefect's Runner holds, stopped ones included.

It reads the Runner's process manager, which Prefect does not document: this fails if an upgrade
moves it, rather than every live run silently losing its lease.
"""

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from prefect.runner import Runner
from prefect.runner._process_manager import ProcessHandle

from emg.models import FlowRunLease
from flows.serve import LeaseKeeper, live_processes, served_deployments

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]


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


def test_the_runner_serves_each_triggers_deployment_and_each_named_in_served_deployments_once(settings):
    settings.EMG_SERVED_DEPLOYMENTS = {
        "emg-test-child/served": "tests.e2e.family_flows.child",
        # Started by a trigger too: served once, under the one name.
        "analyse-study/analysis-request": "flows.analysis.analyse_study",
    }
    names = sorted(f"{deployment.flow_name}/{deployment.name}" for deployment in served_deployments())
    assert names == [
        "analyse-study/analysis-request",
        "deliver-parcel/paid-parcel",
        "emg-test-child/served",
        "process-study/study-report",
        "qc-raw-reads/study-created",
    ]


@pytest.mark.parametrize(
    ("deployment", "message"),
    [
        ("emg-test-child", "must be '<flow name>/<deployment name>'"),
        ("another-flow/served", "is the flow 'emg-test-child'"),
    ],
)
def test_a_served_deployment_not_of_its_flow_is_refused_naming_the_setting(settings, deployment, message):
    settings.EMG_SERVED_DEPLOYMENTS = {deployment: "tests.e2e.family_flows.child"}
    with pytest.raises(ImproperlyConfigured, match=message) as refused:
        served_deployments()
    assert "EMG_SERVED_DEPLOYMENTS" in str(refused.value)


def test_each_runner_group_serves_the_deployments_routed_to_it_and_the_default_group_the_rest(settings):
    settings.EMG_SERVED_DEPLOYMENTS = {"emg-test-child/served": "tests.e2e.family_flows.child"}
    settings.EMG_RUNNER_ROUTES = {"emg-test-child/served": "data-mover"}

    def served_by(group: str) -> list[str]:
        settings.EMG_RUNNER_GROUP = group
        return sorted(f"{deployment.flow_name}/{deployment.name}" for deployment in served_deployments())

    assert served_by("data-mover") == ["emg-test-child/served"]
    assert served_by("default") == [
        "analyse-study/analysis-request",
        "deliver-parcel/paid-parcel",
        "process-study/study-report",
        "qc-raw-reads/study-created",
    ]
    assert served_by("gpu") == []


def test_a_route_for_a_deployment_nothing_declares_is_refused(settings):
    settings.EMG_RUNNER_ROUTES = {"analyse-study/analysis-requests": "data-mover"}
    with pytest.raises(ImproperlyConfigured, match="routes analyse-study/analysis-requests, which no trigger"):
        served_deployments()


@pytest.mark.parametrize("routes", ["move-results/datamove", "=data-mover", "move-results/datamove="])
def test_routes_that_are_not_deployment_equals_group_stop_the_settings_from_loading(routes):
    loaded = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "emg.settings", "EMG_RUNNER_ROUTES": routes},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert loaded.returncode != 0
    assert "EMG_RUNNER_ROUTES" in loaded.stderr and "is not '<flow>/<deployment>=<runner group>'" in loaded.stderr
