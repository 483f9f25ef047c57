"""Stacks a test may kill, piece by piece: the helpers of the resilience and chaos suites.

`KillableStack` is a Prefect runner, a Celery worker and a Celery beat of a test module's own,
on the environment the module chooses (its own zombie threshold, its own Redis or Prefect
server). The session stack's processes are stopped meanwhile (`session_stack_paused`), so no
other consumer, reconciler or runner reaches the test database.

Also here: services a test restarts or stops (Redis, the Prefect server, slurmctld, a
PostgreSQL server of the test's own) and processes it freezes (`freeze_for`).
"""

import os
import shutil
import signal
import subprocess
import tempfile
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
        self.worker = self._worker(f"{label}-celery-worker", self.worker_name)
        # More workers on the same queue, as a deployment may run (start_another_worker).
        self.more_workers: list[ManagedProcess] = []
        self.beat = ManagedProcess(
            f"{label}-celery-beat",
            [celery, "-A", "workers", "beat", "-l", "INFO", "--schedule", str(log_dir / f"{label}-beat.schedule")],
            env=env, log_dir=log_dir,
        )

    def _worker(self, name: str, node_name: str) -> ManagedProcess:
        return ManagedProcess(
            name,
            [venv_script("celery"), "-A", "workers", "worker", "-l", "INFO", "--concurrency", "2", "--without-gossip",
             "--without-mingle", "-n", f"{node_name}@%h"],
            env=self.env, log_dir=self.log_dir,
        )

    def start_another_worker(self) -> ManagedProcess:
        """One more Celery worker on the stack's queue (it consumes events and ticks as the first does)."""
        number = len(self.more_workers) + 2
        worker = self._worker(f"{self.label}-celery-worker-{number}", f"{self.worker_name}-{number}").start()
        self.more_workers.append(worker)
        self.wait_for_worker(f"{self.worker_name}-{number}")
        return worker

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
        return [self.runner, self.worker, *self.more_workers, self.beat]

    def start(self, *, beat: bool = True) -> None:
        """Runner and worker, and the beat unless told not to (a test then starts `self.beat` itself)."""
        for process in self.processes:
            if beat or process is not self.beat:
                process.start()
        wait_until(self.deployment_served, timeout=90, interval=0.5, message="the runner served its deployment")
        self.wait_for_worker()

    def deployment_served(self) -> bool:
        url = f"{self.env['PREFECT_API_URL']}/deployments/name/{ANALYSIS_DEPLOYMENT}"
        return httpx.get(url, timeout=5).status_code == 200

    def wait_for_worker(self, worker_name: str | None = None) -> None:
        worker_name = worker_name or self.worker_name

        def answers() -> bool:
            # A new client each time: a pooled connection does not outlive a Redis restart.
            control = Celery(f"{self.label}-control", broker=self.env["REDIS_URL"])
            try:
                return any(f"{worker_name}@" in reply for answer in control.control.ping(timeout=1) for reply in answer)
            finally:
                control.close()

        wait_until(answers, timeout=60, message=f"Celery worker {worker_name} answers pings")

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


def parent_pid(pid: int) -> int:
    """A process's parent, from /proc (the fields after the command name, which may hold spaces)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def freeze_for(pids: list[int], seconds: float) -> None:
    """SIGSTOP these processes, keep them stopped for `seconds` (a deliberate outage: a VM paused,
    a process swapped out or stuck in the kernel), then SIGCONT them. Nothing they hold is released
    meanwhile, neither sockets nor locks nor database sessions."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


class OwnPostgres:
    """A PostgreSQL server of a test's own (Debian's binaries, run as `postgres`), on a free port,
    trusting local connections, with its data in a directory of its own: one a test may restart."""

    BIN = Path("/usr/lib/postgresql/15/bin")

    def __init__(self, port: int, log_dir: Path):
        self.port = port
        self.log_dir = log_dir
        # Not under pytest's tmp_path: the postgres user must be able to reach it.
        self.root = Path(tempfile.mkdtemp(prefix=f"emg-test-postgres-{port}-"))
        shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"

    def _as_postgres(self, *argv: str, timeout: float = 120) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, timeout=timeout, cwd=self.root,
                       stdin=subprocess.DEVNULL, capture_output=True)

    def _pg_ctl(self, *argv: str) -> None:
        self._as_postgres(str(self.BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-w", *argv)

    def url(self, database: str = "postgres") -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> "OwnPostgres":
        if not self.data.exists():
            self._as_postgres(str(self.BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                              "-E", "UTF8", "--no-sync")
        # pg_ctl remembers these options for `restart`. fsync only matters if the machine loses power,
        # which no test does: a fast restart checkpoints first.
        self._pg_ctl("-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        wait_until(self.answers, timeout=30, message=f"our PostgreSQL on {self.port} answers")
        return self

    def answers(self) -> bool:
        with psycopg.connect(self.url(), connect_timeout=2) as connection:
            return connection.execute("SELECT 1").fetchone() == (1,)

    def restart(self) -> None:
        """`pg_ctl restart -m fast`: every session is cut off, the server comes back with the same data."""
        self._pg_ctl("-m", "fast", "restart")
        wait_until(self.answers, timeout=30, message=f"our PostgreSQL on {self.port} answers again")

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._pg_ctl("-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass  # not running
        if self.log_path.exists():
            shutil.copy(self.log_path, self.log_dir / f"postgres-{self.port}.log")
        shutil.rmtree(self.root, ignore_errors=True)


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
