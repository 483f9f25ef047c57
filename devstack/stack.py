"""The application processes of one local stack, started from one environment.

A `Stack` is a Prefect runner (`flows.serve`), a Celery worker for dispatch, a Celery worker of
its own for the reconcile tick (concurrency 1, so a dispatch backlog never delays a tick), a
Celery beat, and, when asked, Flower and the Django dev server. Each is a `ManagedProcess`: a
test may kill it (SIGKILL, whole process group), freeze it and start it again. The demo, the test
fixtures, the chaos suites and the benchmarks all start their stacks here; the services under
them (Redis, PostgreSQL databases, a Prefect server) are in devstack.services.
"""

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from devstack.processes import ManagedProcess, WaitTimeout, python_module, venv_script, wait_until
from flows.deployments import ANALYSIS_DEPLOYMENT


def celery_worker(
    name: str,
    node: str,
    env: dict[str, str],
    log_dir: Path,
    *,
    roles: str | None,
    concurrency: int = 2,
    pool: str = "prefork",
) -> ManagedProcess:
    """A Celery worker consuming the queues of `roles` (workers.celery: dispatch, reconcile; None: both),
    with `concurrency` processes (pool prefork) or threads (pool threads)."""
    worker_env = (
        {**env, "EMG_WORKER_ROLES": roles} if roles else {k: v for k, v in env.items() if k != "EMG_WORKER_ROLES"}
    )
    return ManagedProcess(
        name,
        [
            venv_script("celery"),
            "-A",
            "workers",
            "worker",
            "-l",
            "INFO",
            "--concurrency",
            str(concurrency),
            "--pool",
            pool,
            "--without-gossip",
            "--without-mingle",
            "-n",
            f"{node}@%h",
        ],
        env=worker_env,
        log_dir=log_dir,
    )


def celery_beat(name: str, env: dict[str, str], log_dir: Path, schedule: Path) -> ManagedProcess:
    return ManagedProcess(
        name,
        [venv_script("celery"), "-A", "workers", "beat", "-l", "INFO", "--schedule", str(schedule)],
        env=env,
        log_dir=log_dir,
    )


def flower(name: str, env: dict[str, str], log_dir: Path, port: int, basic_auth: str | None) -> ManagedProcess:
    """Flower on 127.0.0.1:`port`, on `env`'s broker; `basic_auth` (user:password) is what it asks for."""
    return ManagedProcess(
        name,
        [venv_script("celery"), "-A", "workers", "flower", f"--port={port}", "--address=127.0.0.1"],
        env={**env, **({"FLOWER_BASIC_AUTH": basic_auth} if basic_auth else {})},
        log_dir=log_dir,
    )


def start_flower(env: dict[str, str], log_dir: Path, basic_auth: str) -> tuple[ManagedProcess, str]:
    """A Flower of its own on a free port, answering (200, or 401 without credentials); it and its URL."""
    from devstack.services import free_port

    port = free_port()
    process = flower("flower", env, log_dir, port, basic_auth).start()
    url = f"http://127.0.0.1:{port}/"
    wait_until(lambda: flower_answers(url), timeout=60, interval=0.5, message="Flower answers")
    return process, url


def flower_answers(url: str) -> bool:
    return httpx.get(url, timeout=2).status_code in (200, 401)


def broker_url(env: dict[str, str]) -> str:
    return env.get("CELERY_BROKER_URL") or env["REDIS_URL"]


def worker_answers(env: dict[str, str], node: str, label: str = "emg-stack") -> bool:
    """Whether the Celery worker `node` answers a ping on `env`'s broker."""
    from celery import Celery

    # A new client each time: a pooled connection does not outlive a Redis restart.
    control = Celery(f"{label}-control", broker=broker_url(env))
    try:
        return any(f"{node}@" in reply for answer in control.control.ping(timeout=1) for reply in answer)
    finally:
        control.close()


class Stack:
    """Runner, dispatch worker, tick worker and beat (Flower and web when given ports), all from `env`.

    `env` must name REDIS_URL (or CELERY_BROKER_URL) and PREFECT_API_URL: the stack waits on them.
    """

    def __init__(
        self,
        env: dict[str, str],
        log_dir: Path,
        *,
        label: str = "",
        runner: bool = True,
        flower_port: int | None = None,
        flower_auth: str | None = None,
        web_port: int | None = None,
    ):
        self.label = label
        self.env = env
        self.log_dir = log_dir
        self.held_down: set[str] = set()
        self.worker_name = f"{label or 'stack'}-{os.getpid()}"
        self.runner = (
            ManagedProcess(self._name("prefect-runner"), python_module("flows.serve"), env=env, log_dir=log_dir)
            if runner
            else None
        )
        self.worker = celery_worker(self._name("celery-worker"), self.worker_name, env, log_dir, roles="dispatch")
        self.tick_worker = celery_worker(
            self._name("celery-tick-worker"), f"{self.worker_name}-tick", env, log_dir, roles="reconcile", concurrency=1
        )
        # More workers, as a deployment may run (start_another_worker).
        self.more_workers: list[ManagedProcess] = []
        self.beat = celery_beat(self._name("celery-beat"), env, log_dir, log_dir / f"{self._name('beat')}.schedule")
        self.extras: list[ManagedProcess] = []
        self.flower_port = flower_port
        self.web_port = web_port
        if flower_port is not None:
            self.extras.append(flower(self._name("flower"), env, log_dir, flower_port, flower_auth))
        if web_port is not None:
            self.extras.append(
                ManagedProcess(
                    self._name("web"),
                    python_module("django", "runserver", "--noreload", f"127.0.0.1:{web_port}"),
                    env=env,
                    log_dir=log_dir,
                )
            )

    def _name(self, process: str) -> str:
        return f"{self.label}-{process}" if self.label else process

    @property
    def workers(self) -> list[ManagedProcess]:
        return [self.worker, self.tick_worker, *self.more_workers]

    @property
    def processes(self) -> list[ManagedProcess]:
        """In start order; stopped in reverse."""
        runner = [self.runner] if self.runner is not None else []
        return [*runner, *self.workers, self.beat, *self.extras]

    # --- starting and waiting -------------------------------------------------------------------

    def start(self, *, beat: bool = True) -> "Stack":
        """Everything, and the beat unless told not to (a test then starts `self.beat` itself);
        returns once the runner serves its deployment and every worker answers."""
        for process in self.processes:
            if beat or process is not self.beat:
                process.start()
        self.wait_until_ready()
        return self

    def wait_until_ready(self) -> None:
        if self.runner is not None:
            wait_until(
                self.deployment_served, timeout=120, interval=0.5, message="the Prefect runner serves its deployment"
            )
        self.wait_for_worker()
        self.wait_for_worker(f"{self.worker_name}-tick")
        if self.flower_port is not None:
            flower_url = f"http://127.0.0.1:{self.flower_port}/"
            wait_until(lambda: flower_answers(flower_url), timeout=60, interval=0.5, message="Flower answers")
        if self.web_port is not None:
            url = f"http://127.0.0.1:{self.web_port}/admin/login/"
            wait_until(lambda: httpx.get(url).is_success, timeout=60, message="the Django server answers")

    def exited(self) -> list[ManagedProcess]:
        """Those started that have exited since, but for those held down on purpose (kill_for)."""
        return [
            process
            for process in self.processes
            if process.name not in self.held_down and process.process is not None and not process.running
        ]

    def deployment_served(self) -> bool:
        url = f"{self.env['PREFECT_API_URL']}/deployments/name/{ANALYSIS_DEPLOYMENT}"
        return httpx.get(url, timeout=5).status_code == 200

    def worker_process(self, worker_name: str | None = None) -> ManagedProcess:
        node = worker_name or self.worker_name
        nodes = {self.worker_name: self.worker, f"{self.worker_name}-tick": self.tick_worker}
        nodes.update({f"{self.worker_name}-{number}": worker for number, worker in enumerate(self.more_workers, 2)})
        return nodes[node]

    def wait_for_worker(self, worker_name: str | None = None, timeout: float = 60) -> None:
        """Until the worker answers a ping; at the deadline, fail with the end of its log (a CI run's
        output is often all there is to read of a worker that went quiet)."""
        node = worker_name or self.worker_name
        try:
            wait_until(
                lambda: worker_answers(self.env, node, self.label or "emg-stack"),
                timeout=timeout,
                message=f"Celery worker {node} answers pings",
            )
        except WaitTimeout as error:
            process = self.worker_process(node)
            state = "running" if process.running else "exited"
            raise WaitTimeout(
                f"{error}\n--- {process.name} ({state}), its last lines ---\n{process.log_tail(40)}"
            ) from None

    def revive_if_unresponsive(self, worker_name: str | None = None, after: float = 45) -> str | None:
        """What a liveness probe does: a worker that answers no ping for `after` seconds is killed and
        started again. Returns None if it answered, else the end of its log from before the restart."""
        try:
            self.wait_for_worker(worker_name, timeout=after)
            return None
        except WaitTimeout as error:
            process = self.worker_process(worker_name)
            self.held_down.add(process.name)  # the supervisor must not start it a second time
            try:
                process.kill()
                if process.process is not None:
                    process.process.wait(timeout=30)
                process.start()
            finally:
                self.held_down.discard(process.name)
            self.wait_for_worker(worker_name)
            return str(error)

    def start_another_worker(self, roles: str = "dispatch") -> ManagedProcess:
        """One more Celery worker, consuming the queues of `roles` as the stack's own worker of them does."""
        number = len(self.more_workers) + 2
        node = f"{self.worker_name}-{number}"
        concurrency = 1 if roles == "reconcile" else 2
        worker = celery_worker(
            self._name(f"celery-worker-{number}"), node, self.env, self.log_dir, roles=roles, concurrency=concurrency
        ).start()
        self.more_workers.append(worker)
        self.wait_for_worker(node)
        return worker

    # --- stopping, killing, pausing -------------------------------------------------------------

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def kill_for(self, process: ManagedProcess, seconds: float) -> None:
        """SIGKILL one of ours, keep it down for `seconds` (a deliberate outage), start it again."""
        self.held_down.add(process.name)
        try:
            process.kill()
            time.sleep(seconds)
            process.start()
        finally:
            self.held_down.discard(process.name)

    @contextmanager
    def paused(self, *, keep_runner: bool = False) -> Iterator[None]:
        """Workers and beat (and the runner unless kept) stopped for the duration, so nothing of this
        stack consumes, ticks or runs flows meanwhile; started again after, and waited for."""
        stopped = [
            process for process in self.processes if process.running and not (keep_runner and process is self.runner)
        ]
        for process in reversed(stopped):
            process.stop()
        try:
            yield
        finally:
            for process in stopped:
                process.start()
            self.wait_for_worker()
            self.wait_for_worker(f"{self.worker_name}-tick")

    @contextmanager
    def supervised(self, interval: float = 1.0) -> Iterator[list[str]]:
        """Start again, as a supervisor (compose's `restart:`) would, whatever exits on its own
        meanwhile; yields the list of what was, by name (killed ones the test restarts itself)."""
        revived: list[str] = []
        stopping = threading.Event()

        def watch() -> None:
            while not stopping.wait(interval):
                for process in self.processes:
                    if not process.running and process.name not in self.held_down:
                        revived.append(process.name)
                        process.start()

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        try:
            yield revived
        finally:
            stopping.set()
            thread.join(timeout=10)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_tail()}" for p in self.processes)
