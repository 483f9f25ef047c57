"""Helpers of the resilience and chaos suites: services a test kills, stops or freezes.

The stacks they kill piece by piece are devstack.Stack (a Prefect runner, Celery workers and a
beat of a test module's own, on the environment the module chooses); the session stack is
paused meanwhile (`Stack.paused`), so no other consumer, reconciler or runner reaches the test
database. Here: slurmctld, a PostgreSQL server of the test's own, database sessions cut off,
and processes frozen (`freeze_for`).
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from devstack.processes import wait_until
from tests.services import database_url

SLURMCTLD_PID_FILE = Path("/run/emg-slurm/slurmctld.pid")
SLURM_LOG_DIR = Path("/var/log/emg-slurm")


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
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv],
            check=True,
            timeout=timeout,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )

    def _pg_ctl(self, *argv: str) -> None:
        self._as_postgres(str(self.BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-w", *argv)

    def url(self, database: str = "postgres") -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> "OwnPostgres":
        if not self.data.exists():
            self._as_postgres(
                str(self.BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            )
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
        subprocess.run(
            ["slurmctld"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=60
        )
    wait_until(
        lambda: subprocess.run(["scontrol", "ping"], capture_output=True, timeout=20, check=False).returncode == 0,
        timeout=90,
        interval=0.5,
        message="slurmctld answers scontrol ping",
    )


def kill_slurmctld_when_idle(idle_since, idle_seconds: float = 5) -> None:
    """SIGKILL slurmctld, but only once nothing was submitted for `idle_seconds` (`idle_since()`: the
    time of the last submission, or None) so that it has saved every job it accepted."""

    def idle() -> bool:
        last = idle_since()
        return last is None or time.time() - last >= idle_seconds

    wait_until(idle, timeout=120, interval=0.5, message=f"no Slurm submission for {idle_seconds}s")
    stop_slurmctld(signal.SIGKILL)
