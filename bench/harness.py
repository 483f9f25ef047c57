"""What the benchmarks share: their own services, Slurm cleanup, percentiles and the one JSON line.

A benchmark calls `configure_environment()` before it imports Django or Prefect (both read their
settings from the environment on import), then opens a `BenchServices` and asks it for what it
needs. Everything it starts is stopped, every database it creates is dropped, and every Slurm job
whose work dir lies under this run's work dir is cancelled, on the way out, even after a failure.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import uuid
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from devstack.processes import ManagedProcess  # noqa: E402
from devstack.services import (  # noqa: E402
    free_port,
    prefect_database_url,
    recreate_postgres_database,
    start_prefect_server,
    start_redis,
)

SESSION = uuid.uuid4().hex[:8]
DATABASE_NAME = f"emg_bench_{SESSION}"
PREFECT_DATABASE_NAME = f"emg_bench_prefect_{SESSION}"


def configure_environment(**overrides: str) -> None:
    """This run's own database, Redis, Prefect server and directories, whatever the caller's environment says."""
    prefect_home = tempfile.mkdtemp(prefix=f"emg-bench-prefect-{SESSION}-")
    os.environ.update(
        DJANGO_SETTINGS_MODULE="emg.settings",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{DATABASE_NAME}",
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        EMG_INSTANCE_NAMESPACE=f"bench-{SESSION}",
        EMG_WORK_DIR=tempfile.mkdtemp(prefix=f"emg-bench-{SESSION}-"),
        EMG_MAX_SUBMISSIONS_PER_MINUTE="1000",
        PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api",
        PREFECT_HOME=prefect_home,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=os.path.join(prefect_home, "results"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        **overrides,
    )
    os.environ.pop("CELERY_BROKER_URL", None)


def emit(bench: str, **figures) -> None:
    """The benchmark's result: one JSON line, printed last."""
    print(json.dumps({"bench": bench, **figures}), flush=True)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was measured, never an interpolation."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def cancel_jobs_under(work_dir: str) -> int:
    """Cancel every job of ours whose work dir lies under `work_dir`; how many there were."""
    listed = subprocess.run(
        ["squeue", "--noheader", "--me", "--all", "-t", "all", "-o", "%A|%Z"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    prefix = work_dir.rstrip("/") + "/"
    job_ids = [
        line.split("|", 1)[0]
        for line in listed.splitlines()
        if "|" in line and (line.split("|", 1)[1].rstrip("/") + "/").startswith(prefix)
    ]
    for start in range(0, len(job_ids), 1000):
        subprocess.run(["scancel", *job_ids[start : start + 1000]], capture_output=True, timeout=120, check=False)
    return len(job_ids)


class BenchServices(ExitStack):
    """The services one benchmark run needs, each started on request and undone on exit (last first)."""

    def __init__(self, name: str):
        super().__init__()
        self.log_dir = ROOT / "test-artifacts" / "bench-logs" / f"{name}-{SESSION}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        work_dir = os.environ["EMG_WORK_DIR"]
        prefect_home = os.environ["PREFECT_HOME"]
        self.callback(shutil.rmtree, work_dir, ignore_errors=True)
        self.callback(shutil.rmtree, prefect_home, ignore_errors=True)
        log(f"{name}: session {SESSION}, service logs in {self.log_dir}")

    def env(self, **overrides: str) -> dict[str, str]:
        return {**os.environ, **overrides}

    def django_database(self) -> None:
        """A fresh PostgreSQL database, migrated, that Django in this process uses; dropped on exit."""
        import django
        from django.core.management import call_command
        from django.db import connections

        recreate_postgres_database(DATABASE_NAME)
        self.callback(recreate_postgres_database, DATABASE_NAME, create=False)
        self.callback(connections.close_all)
        django.setup()
        call_command("migrate", interactive=False, verbosity=0)

    def redis(self) -> str:
        import redis

        url = os.environ["REDIS_URL"]
        server = start_redis(redis.connection.parse_url(url)["port"], self.log_dir, self.env())
        self.callback(server.stop)
        return url

    def prefect_server(self) -> ManagedProcess:
        """A Prefect server of this run's own, on a fresh PostgreSQL database (dropped on exit)."""
        recreate_postgres_database(PREFECT_DATABASE_NAME)
        self.callback(recreate_postgres_database, PREFECT_DATABASE_NAME, create=False)
        env = self.env(PREFECT_SERVER_DATABASE_CONNECTION_URL=prefect_database_url(PREFECT_DATABASE_NAME))
        api_url = os.environ["PREFECT_API_URL"]
        server = start_prefect_server(env, self.log_dir, api_url)
        self.callback(server.stop)
        return server

    def stack(self, label: str, *, runner: bool = True):
        """The application processes (devstack.Stack: runner, dispatch and tick workers, beat), started
        and waited for; stopped on exit."""
        from devstack.stack import Stack

        stack = Stack(self.env(), self.log_dir, label=label, runner=runner)
        self.callback(stack.stop)
        return stack.start()

    def process(self, name: str, argv: list[str], **env: str) -> ManagedProcess:
        managed = ManagedProcess(name, argv, env=self.env(**env), log_dir=self.log_dir).start()
        self.callback(managed.stop)
        return managed

    def slurm_cleanup(self) -> None:
        """On exit, cancel every job submitted under this run's work dir. Register it before starting
        anything that submits, so it runs after those have stopped."""
        work_dir = os.environ["EMG_WORK_DIR"]

        def cancel() -> None:
            cancelled = cancel_jobs_under(work_dir)
            if cancelled:
                log(f"cancelled {cancelled} Slurm jobs under {work_dir}")

        self.callback(cancel)

    def ena_server(self):
        """Our local fake of the ENA Portal API (recorded studies); its URLs go into the environment."""
        from devstack.ena_fake import FakeEnaServer

        server = FakeEnaServer()
        server.start()
        self.callback(server.stop)
        os.environ.update(EMG_ENA_PORTAL_API=server.base_url, EMG_ENA_FASTQ_URL_PREFIX=server.fastq_url_prefix)
        return server


def children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(roots: list[int]) -> list[int]:
    """The root processes and all their descendants, from /proc (Linux)."""
    children = children_by_parent()
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found and Path(f"/proc/{pid}").exists():
            found.append(pid)
            todo += children.get(pid, [])
    return found


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in kB; PSS shares each shared page among the processes that map it."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, pss


def tree_usage(roots: list[int]) -> dict:
    """Processes, total RSS and total PSS (MB) of the given processes and their descendants."""
    pids = process_tree(roots)
    sizes = [memory_kb(pid) for pid in pids]
    return {
        "processes": len(pids),
        "rss_mb": round(sum(rss for rss, _ in sizes) / 1024, 1),
        "pss_mb": round(sum(pss for _, pss in sizes) / 1024, 1),
    }


def kill_pids(pids: list[int]) -> None:
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
