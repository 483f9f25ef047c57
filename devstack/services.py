"""The services under a stack, each started once, here: Redis, a PostgreSQL database, a Prefect server.

No Django import: the benchmarks call these before they configure Django, and the demo before
it knows which database it runs on.
"""

import socket
from pathlib import Path

import httpx

from devstack.processes import ManagedProcess, venv_script, wait_until

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    """A port nothing listens on now: each stack's services get their own."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_redis(port: int, log_dir: Path, env: dict[str, str], name: str = "redis") -> ManagedProcess:
    """A Redis that keeps nothing on disk: a restart starts it empty."""
    import redis

    server = ManagedProcess(
        name,
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        env=env,
        log_dir=log_dir,
    ).start()

    def answers() -> bool:
        if not server.running:
            raise RuntimeError(f"Redis exited:\n{server.log_tail()}")
        return bool(redis.Redis(port=port).ping())

    wait_until(answers, timeout=20, message=f"Redis on {port} answers")
    return server


def recreate_postgres_database(name: str, *, create: bool = True) -> None:
    """Drop the database (cutting off its sessions) and, unless told not to, create it empty."""
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if create:
            connection.execute(f'CREATE DATABASE "{name}"')


def prefect_database_url(name: str) -> str:
    """A Prefect server's connection URL for a database on the local PostgreSQL (SQLite locks up under load)."""
    return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


def start_prefect_server(
    env: dict[str, str], log_dir: Path, api_url: str, name: str = "prefect-server"
) -> ManagedProcess:
    """`prefect server start` on the port of `api_url`; returns once /health answers."""
    port = api_url.rsplit(":", 1)[1].split("/")[0]
    server = ManagedProcess(
        name,
        [venv_script("prefect"), "server", "start", "--host", "127.0.0.1", "--port", port],
        env=env,
        log_dir=log_dir,
    ).start()

    def healthy() -> bool:
        if not server.running:
            raise RuntimeError(f"Prefect server exited:\n{server.log_tail()}")
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200

    wait_until(healthy, timeout=90, interval=0.5, message="Prefect server healthy")
    return server


def restart_prefect_server(server: ManagedProcess, env: dict[str, str], log_dir: Path, api_url: str) -> ManagedProcess:
    """Start the server again on the same port (the killed one's socket may linger for a moment)."""
    assert server.process is not None
    server.process.wait(timeout=30)
    return start_prefect_server(env, log_dir, api_url, server.name)
