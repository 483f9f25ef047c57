"""`/health`: can this service reach what it depends on? Used by compose's healthchecks.

Every check runs at once, each with its own short timeout, and the whole answer is
bounded by HEALTH_DEADLINE_SECONDS: a dead dependency makes the endpoint say so, never hang.
"""

import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import httpx
import redis
from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from emg.cluster import cluster_from_settings
from emg.log import mask_secrets
from emg.models import ClusterJob
from slurm_adapter import RestCluster, resolve_backend

CHECK_TIMEOUT_SECONDS = 2
SLURM_TIMEOUT_SECONDS = 5
HEALTH_DEADLINE_SECONDS = SLURM_TIMEOUT_SECONDS + 1


def check_database() -> None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    finally:
        # Checks run in worker threads, each with its own connection: do not leave them open.
        connection.close()


def check_redis() -> None:
    client = redis.Redis.from_url(
        settings.REDIS_URL, socket_timeout=CHECK_TIMEOUT_SECONDS, socket_connect_timeout=CHECK_TIMEOUT_SECONDS
    )
    with client:
        client.ping()


def check_prefect() -> None:
    httpx.get(f"{settings.PREFECT_API_URL}/health", timeout=CHECK_TIMEOUT_SECONDS).raise_for_status()


def check_slurm() -> None:
    result = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=SLURM_TIMEOUT_SECONDS)
    if result.returncode != 0 or "UP" not in result.stdout:
        raise RuntimeError((result.stdout + result.stderr).strip() or f"scontrol ping exited {result.returncode}")


def check_slurmrestd() -> None:
    """slurmrestd answers, with our token, and slurmctld behind it: a refused token shows here."""
    cluster = cluster_from_settings()
    assert isinstance(cluster, RestCluster)
    try:
        cluster.ping()
    finally:
        cluster.close()


def slurm_is_the_backend() -> bool:
    return resolve_backend(settings.EMG_CLUSTER_BACKEND) == "slurm"


def checks() -> dict[str, Callable[[], None]]:
    selected = {"database": check_database, "redis": check_redis, "prefect": check_prefect}
    if slurm_is_the_backend():
        selected["slurm"] = check_slurm
    elif resolve_backend(settings.EMG_CLUSTER_BACKEND) == "slurmrestd":
        selected["slurmrestd"] = check_slurmrestd
    return selected


def timed(check: Callable[[], None]) -> dict:
    started = time.monotonic()
    try:
        check()
    except Exception as error:  # any failure of a dependency is the answer, not a crash
        outcome: dict[str, object] = {"status": "error", "error": mask_secrets(f"{type(error).__name__}: {error}")[:500]}
    else:
        outcome = {"status": "ok"}
    outcome["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
    return outcome


@never_cache
@require_GET
def health(request):
    """All checks, or only those named by `?check=` (a container's healthcheck asks for what it needs)."""
    selected = checks()
    wanted = request.GET.getlist("check")
    unknown = sorted(set(wanted) - selected.keys())
    if unknown:
        return JsonResponse({"status": "error", "error": f"unknown checks {unknown}; known: {sorted(selected)}"},
                            status=400)
    if wanted:
        selected = {name: check for name, check in selected.items() if name in wanted}
    executor = ThreadPoolExecutor(max_workers=len(selected), thread_name_prefix="health")
    futures = {name: executor.submit(timed, check) for name, check in selected.items()}
    wait(futures.values(), timeout=HEALTH_DEADLINE_SECONDS)
    # A check still running past the deadline is reported, and left to end on its own timeout.
    executor.shutdown(wait=False, cancel_futures=True)
    results = {
        name: future.result() if future.done() else {"status": "error", "error": "no answer within the deadline"}
        for name, future in futures.items()
    }
    healthy = all(result["status"] == "ok" for result in results.values())
    answer = {"status": "ok" if healthy else "error", "checks": results}
    if not wanted and results.get("database", {}).get("status") == "ok":
        answer["alerts"] = alerts()
    return JsonResponse(answer, status=200 if healthy else 503)


def alerts() -> dict:
    """What an operator must look at although every service answers: never a reason for a 503."""
    unreadable = ClusterJob.objects.live().exclude(unreadable_state="")
    return {
        "unreadable_jobs": [{"job": job.id, "slurm_job_id": job.slurm_job_id, "state": job.unreadable_state,
                             "since": job.unreadable_since.isoformat() if job.unreadable_since else None}
                            for job in unreadable[:20]],
        "jobs_waiting_out_sbatch_errors": ClusterJob.objects.declared().exclude(submit_error="").count(),
    }
