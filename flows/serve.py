"""The Prefect runner for our deployments: `python -m flows.serve`.

It serves a deployment of every flow a trigger starts (emg.triggers, EMG_TRIGGER_MODULES: the
analysis flow, and any other the settings declare) and of every flow EMG_SERVED_DEPLOYMENTS names
(flows no trigger starts: child flows, flows.child_flows), polls the Prefect API for scheduled and
resumed runs of them and runs each in a fresh subprocess, so a suspended flow holds no process
at all; at most EMG_RUNNER_LIMIT at once (the rest wait, Scheduled), so a burst of requests cannot start
hundreds of flow processes.

Beside it, a thread renews a lease (emg.leases) for every flow-run process the runner has
started and that still exists, every EMG_FLOW_LEASE_RENEW_SECONDS: a process that is alive but
silent (SIGSTOPped, swapped out, stuck in the kernel) sends no Prefect heartbeat, and only the
lease tells the reconciler it would continue.
"""

import asyncio
import logging
import os
import socket
import threading
from typing import Any, cast
from uuid import UUID

from flows.django_setup import setup_django

setup_django()

from django.conf import settings  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.db import close_old_connections  # noqa: E402
from django.utils.module_loading import import_string  # noqa: E402
from prefect.deployments.runner import RunnerDeployment  # noqa: E402
from prefect.runner import Runner  # noqa: E402

from emg import leases, triggers  # noqa: E402

logger = logging.getLogger(__name__)


def live_processes(runner: Runner) -> dict[UUID, int]:
    """The runner's flow-run processes that still exist (a stopped one does), by flow run id.

    Prefect's Runner keeps them in its process manager, which has no public API: read here only,
    and tests/flows/test_serve.py fails if a Prefect upgrade moves it.
    """
    manager: Any = runner._process_manager
    found = {}
    for flow_run_id in manager.flow_run_ids():
        handle = manager.get(flow_run_id)
        if handle is not None and handle.pid and handle.is_alive():
            found[flow_run_id] = handle.pid
    return found


class LeaseKeeper(threading.Thread):
    """Renews the leases of the runner's live processes and releases those of processes gone."""

    def __init__(self, runner: Runner, every: float, host: str | None = None):
        super().__init__(name="emg-flow-run-leases", daemon=True)
        self.runner = runner
        self.every = every
        self.host = host or socket.gethostname()
        self.stopping = threading.Event()
        self.leased: dict[UUID, int] = {}

    def renew_once(self) -> None:
        # This thread lives as long as the runner: its connection is checked (and replaced if the
        # database restarted) before each use, as a request cycle would.
        close_old_connections()
        held = live_processes(self.runner)
        leases.renew(self.host, held)
        leases.release(self.host, {run: pid for run, pid in self.leased.items() if held.get(run) != pid})
        self.leased = held

    def run(self) -> None:
        while not self.stopping.wait(self.every):
            try:
                self.renew_once()
            except Exception:  # the next round tries again; a lease lapses only after the zombie threshold
                logger.exception("renewing flow-run leases failed")


def served_deployments() -> list[RunnerDeployment]:
    """A deployment of each flow a trigger starts (emg.triggers: `flow`, by its dotted path), and of
    each flow EMG_SERVED_DEPLOYMENTS names (started by no trigger: e.g. child flows, which other
    flows start), under the name it is started by, once however many name it."""
    wanted = {
        trigger.deployment: (trigger.flow, f"trigger {trigger.name}")
        for trigger in reversed(triggers.all_triggers())
        if trigger.flow is not None
    }
    for deployment, flow_path in settings.EMG_SERVED_DEPLOYMENTS.items():
        wanted.setdefault(deployment, (flow_path, "EMG_SERVED_DEPLOYMENTS"))
    return deployments_of(routed_here(wanted, settings.EMG_RUNNER_ROUTES, settings.EMG_RUNNER_GROUP))


def routed_here(wanted: dict[str, tuple[str, str]], routes: dict[str, str], group: str) -> dict[str, tuple[str, str]]:
    """The deployments this runner's group serves: those routed to it, or, for the default group,
    those routed nowhere. A route naming a deployment nothing declares is a typo that would leave
    the intended one served elsewhere, so it is refused."""
    unknown = sorted(set(routes) - set(wanted))
    if unknown:
        raise ImproperlyConfigured(
            f"EMG_RUNNER_ROUTES routes {', '.join(unknown)}, which no trigger or EMG_SERVED_DEPLOYMENTS declares"
        )
    return {name: how for name, how in wanted.items() if routes.get(name, "default") == group}


def deployments_of(wanted: dict[str, tuple[str, str]]) -> list[RunnerDeployment]:
    """The deployments named (full name to the flow's dotted path and who asks for it), each checked
    to be a deployment of that flow."""
    deployments = []
    for deployment, (flow_path, source) in wanted.items():
        if "/" not in deployment:
            raise ImproperlyConfigured(
                f"{source}: deployment must be '<flow name>/<deployment name>', not {deployment!r}"
            )
        flow = import_string(flow_path)
        flow_name, deployment_name = deployment.split("/", 1)
        if flow.name != flow_name:
            raise ImproperlyConfigured(f"{source} starts {deployment}, but {flow_path} is the flow {flow.name!r}")
        # Called from sync code, to_deployment returns the deployment itself (not a coroutine).
        deployments.append(cast(RunnerDeployment, flow.to_deployment(name=deployment_name)))
    return deployments


def main() -> None:
    if settings.EMG_RUNNER_LIMIT < 1:
        raise ImproperlyConfigured(f"EMG_RUNNER_LIMIT must be at least 1, not {settings.EMG_RUNNER_LIMIT}")
    if not 0 < settings.EMG_FLOW_LEASE_RENEW_SECONDS < settings.EMG_ZOMBIE_AFTER_SECONDS / 2:
        raise ImproperlyConfigured(
            f"EMG_FLOW_LEASE_RENEW_SECONDS ({settings.EMG_FLOW_LEASE_RENEW_SECONDS}) must be positive and less than "
            f"half of EMG_ZOMBIE_AFTER_SECONDS ({settings.EMG_ZOMBIE_AFTER_SECONDS}), or live runs lose their lease"
        )
    # Flow-run subprocesses inherit this: their heartbeats tell a live run from a zombie.
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(settings.EMG_FLOW_HEARTBEAT_SECONDS))
    runner = Runner(limit=settings.EMG_RUNNER_LIMIT)
    served = served_deployments()
    if not served:
        raise ImproperlyConfigured(f"no deployment is routed to this runner's group, {settings.EMG_RUNNER_GROUP!r}")
    for deployment in served:
        runner.add_deployment(deployment)
    keeper = LeaseKeeper(runner, settings.EMG_FLOW_LEASE_RENEW_SECONDS)
    keeper.start()
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        logger.info("interrupted; the runner has stopped")
    finally:
        keeper.stopping.set()


if __name__ == "__main__":
    main()
