"""Stacks a test may kill, piece by piece: the helpers of the resilience and chaos suites.

`KillableStack` is a Prefect runner, a Celery worker and a Celery beat of a test module's own,
on the environment the module chooses (its own zombie threshold, its own Redis or Prefect
server). The session stack's processes are stopped meanwhile (`session_stack_paused`), so no
other consumer, reconciler or runner reaches the test database.
"""

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import redis
from celery import Celery

from emg.processes import (
    ManagedProcess,
    python_module,
    start_prefect_server,
    venv_script,
    wait_until,
)
from flows.deployments import ANALYSIS_DEPLOYMENT
from tests.services import database_url

SLURMCTLD_PID_FILE = Path("/run/emg-slurm/slurmctld.pid")
SLURM_LOG_DIR = Path("/var/log/emg-slurm")


class KillableStack:
    """Runner, worker and beat started from `env`; each can be killed (SIGKILL, whole group) and started again."""

    def __init__(self, label: str, env: dict[str, str], log_dir: Path):
        self.label = label
        self.env = env
        self.log_dir = log_dir
        celery = venv_script("celery")
        self.runner = ManagedProcess(f"{label}-prefect-runner", python_module("flows.serve"), env=env, log_dir=log_dir)
        self.held_down: set[str] = set()
        self.worker_name = f"{label}-{os.getpid()}"
        self.worker = ManagedProcess(
            f"{label}-celery-worker",
            [celery, "-A", "workers", "worker", "-l", "INFO", "--concurrency", "2", "--without-gossip",
             "--without-mingle", "-n", f"{self.worker_name}@%h"],
            env=env, log_dir=log_dir,
        )
        self.beat = ManagedProcess(
            f"{label}-celery-beat",
            [celery, "-A", "workers", "beat", "-l", "INFO", "--schedule", str(log_dir / f"{label}-beat.schedule")],
            env=env, log_dir=log_dir,
        )

    def kill_for(self, process: ManagedProcess, seconds: float) -> None:
        """SIGKILL one of ours, keep it down for `seconds` (a deliberate outage), start it again."""
        self.held_down.add(process.name)
        try:
            process.kill()
            time.sleep(seconds)
            process.start()
        finally:
            self.held_down.discard(process.name)

    @property
    def processes(self) -> list[ManagedProcess]:
        return [self.runner, self.worker, self.beat]

    def start(self) -> None:
        for process in self.processes:
            process.start()
        wait_until(self.deployment_served, timeout=90, interval=0.5, message="the runner served its deployment")
        self.wait_for_worker()

    def deployment_served(self) -> bool:
        url = f"{self.env['PREFECT_API_URL']}/deployments/name/{ANALYSIS_DEPLOYMENT}"
        return httpx.get(url, timeout=5).status_code == 200

    def wait_for_worker(self) -> None:
        def answers() -> bool:
            # A new client each time: a pooled connection does not outlive a Redis restart.
            control = Celery(f"{self.label}-control", broker=self.env["REDIS_URL"])
            try:
                return any(self.worker_name in reply for answer in control.control.ping(timeout=1) for reply in answer)
            finally:
                control.close()

        wait_until(answers, timeout=60, message=f"Celery worker {self.worker_name} answers pings")

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

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_tail()}" for p in self.processes)


@contextmanager
def session_stack_paused(stack) -> Iterator[None]:
    """The session stack's runner, worker and beat stopped for the duration; started again after."""
    for process in (stack.beat, stack.worker, stack.runner):
        process.stop()
    try:
        yield
    finally:
        for process in (stack.runner, stack.worker, stack.beat):
            process.start()
        from workers import app

        wait_until(lambda: app.control.ping(timeout=1), timeout=60, message="the session's Celery worker is back")


def start_redis(port: int, log_dir: Path, env: dict[str, str], name: str) -> ManagedProcess:
    """A Redis that keeps nothing on disk: a restart starts it empty."""
    server = ManagedProcess(
        name, ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        env=env, log_dir=log_dir,
    ).start()
    wait_until(lambda: redis.Redis(port=port).ping(), timeout=20, message=f"Redis on {port} answers")
    return server


def restart_prefect_server(server: ManagedProcess, env: dict[str, str], log_dir: Path, api_url: str) -> ManagedProcess:
    """Start the server again on the same port (the killed one's socket may linger for a moment)."""
    server.process.wait(timeout=30)
    return start_prefect_server(env, log_dir, api_url)


def terminate_database_backends(database: str, spare: list[int]) -> int:
    """pg_terminate_backend on every connection to `database` but these: the server stays up."""
    with psycopg.connect(database_url(), autocommit=True) as connection:
        rows = connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid() AND NOT pid = ANY(%s)",
            [database, spare],
        ).fetchall()
    return sum(1 for (terminated,) in rows if terminated)


# --- slurmctld ------------------------------------------------------------------------------------

def slurmctld_pid() -> int | None:
    try:
        pid = int(SLURMCTLD_PID_FILE.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def stop_slurmctld(sig: int) -> None:
    """Signal slurmctld (SIGTERM: it saves its state and exits; SIGKILL: it just dies) and wait until it is gone."""
    pid = slurmctld_pid()
    assert pid is not None, "slurmctld is not running"
    os.kill(pid, sig)

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(gone, timeout=60, message=f"slurmctld ({pid}) exited after signal {sig}")


def start_slurmctld() -> None:
    """As scripts/slurm-up.sh starts it; then wait until it answers."""
    with open(SLURM_LOG_DIR / "slurmctld.out", "ab") as log:
        subprocess.run(["slurmctld"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, check=True,
                       timeout=60)
    wait_until(lambda: subprocess.run(["scontrol", "ping"], capture_output=True, timeout=20, check=False).returncode == 0,
               timeout=90, interval=0.5, message="slurmctld answers scontrol ping")


def kill_slurmctld_when_idle(idle_since, idle_seconds: float = 5) -> None:
    """SIGKILL slurmctld, but only once nothing was submitted for `idle_seconds` (`idle_since()`: the
    time of the last submission, or None) so that it has saved every job it accepted."""
    def idle() -> bool:
        last = idle_since()
        return last is None or time.time() - last >= idle_seconds

    wait_until(idle, timeout=120, interval=0.5, message=f"no Slurm submission for {idle_seconds}s")
    stop_slurmctld(signal.SIGKILL)
