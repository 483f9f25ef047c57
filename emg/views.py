"""`/health`, `/health/detail` and `/metrics`: what monitoring and container healthchecks read.

`/health` is liveness for anyone (compose's healthchecks ask it): each check's "ok" or "error" and
nothing more, no error text, no host name. It answers from results cached for
EMG_HEALTH_CACHE_SECONDS: a burst of callers shares one run of each check, and a check runs on one
of a few long-lived threads (never a thread or an `scontrol` per call). A check that hangs is
reported as such once HEALTH_DEADLINE_SECONDS have passed; it is never started again while it still
runs, so hung checks never pile up. `/health/detail` adds errors, latencies and alerts, and
`/metrics` serves the Prometheus figures: both for staff (the admin's login) or for a caller
presenting EMG_MONITORING_TOKEN as a bearer token.
"""

import hmac
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import httpx
import redis
from django.conf import settings
from django.db import connection
from django.http import HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from emg.cluster import cluster_from_settings
from emg.log import mask_secrets
from emg.metrics import registry
from emg.models import ClusterJob
from slurm_adapter import RestCluster, resolve_backend

CHECK_TIMEOUT_SECONDS = 2
SLURM_TIMEOUT_SECONDS = 5
HEALTH_DEADLINE_SECONDS = SLURM_TIMEOUT_SECONDS + 1


# --- who may see the details ---------------------------------------------------------------------


def is_operator(request) -> bool:
    """Staff logged in to the admin, or a caller with the monitoring token (Prometheus)."""
    user = getattr(request, "user", None)
    if user is not None and user.is_active and user.is_staff:
        return True
    token = settings.EMG_MONITORING_TOKEN
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    return (
        bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())
    )


def refuse() -> HttpResponse:
    response = HttpResponse(
        "Staff login or the monitoring token (Authorization: Bearer ...) required.\n",
        status=401,
        content_type="text/plain",
    )
    response["WWW-Authenticate"] = 'Bearer realm="emg"'
    return response


# --- the checks ----------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Check:
    run: Callable[[], None]
    # What the check talks to: a result is cached per target, so a changed setting is checked afresh.
    target: Callable[[], str]


CHECKS = {
    "database": Check(
        check_database, lambda: f"{connection.settings_dict.get('HOST')}/{connection.settings_dict.get('NAME')}"
    ),
    "redis": Check(check_redis, lambda: settings.REDIS_URL),
    "prefect": Check(check_prefect, lambda: settings.PREFECT_API_URL),
    "slurm": Check(check_slurm, lambda: "scontrol"),
    "slurmrestd": Check(check_slurmrestd, lambda: settings.EMG_SLURMRESTD_URL),
}


def checks() -> dict[str, Check]:
    backend = resolve_backend(settings.EMG_CLUSTER_BACKEND)
    cluster_check = {"slurm": "slurm", "slurmrestd": "slurmrestd"}.get(backend)
    return {
        name: check for name, check in CHECKS.items() if name not in ("slurm", "slurmrestd") or name == cluster_check
    }


def timed(check: Callable[[], None]) -> dict:
    started = time.monotonic()
    try:
        check()
    except Exception as error:  # any failure of a dependency is the answer, not a crash
        outcome: dict[str, object] = {
            "status": "error",
            "error": mask_secrets(f"{type(error).__name__}: {error}")[:500],
        }
    else:
        outcome = {"status": "ok"}
    outcome["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
    return outcome


class CheckCache:
    """Each check's last result, and the one run of it in flight, per target."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.results: dict[tuple[str, str], tuple[float, dict]] = {}
        self.running: dict[tuple[str, str], tuple[float, Future]] = {}
        # One thread per check at most: a hung check holds its own, never the others'.
        self.executor = ThreadPoolExecutor(max_workers=len(CHECKS), thread_name_prefix="health")

    def results_of(self, selected: dict[str, Check]) -> dict[str, dict]:
        now = time.monotonic()
        answers: dict[str, dict] = {}
        pending: dict[str, tuple[Future, float]] = {}
        with self.lock:
            for name, check in selected.items():
                key = (name, check.target())
                cached = self.results.get(key)
                if cached is not None and now - cached[0] < settings.EMG_HEALTH_CACHE_SECONDS:
                    answers[name] = {**cached[1], "age_s": round(now - cached[0], 1)}
                    continue
                running = self.running.get(key)
                if running is None or running[1].done():
                    running = (now, self.executor.submit(self.run_and_keep, key, check))
                    self.running[key] = running
                # A run an earlier caller started keeps its own deadline: once a check has hung
                # past it, callers are answered at once instead of each waiting anew.
                started, future = running
                pending[name] = (future, started + HEALTH_DEADLINE_SECONDS)
        for name, (future, deadline) in pending.items():
            wait([future], timeout=max(deadline - time.monotonic(), 0))
            answers[name] = (
                {**future.result(), "age_s": 0.0}
                if future.done()
                else {"status": "error", "error": "no answer within the deadline (the check is still running)"}
            )
        return answers

    def run_and_keep(self, key: tuple[str, str], check: Check) -> dict:
        outcome = timed(check.run)
        with self.lock:
            self.results[key] = (time.monotonic(), outcome)
        return outcome


_cache = CheckCache()


def selected_checks(request) -> dict[str, Check] | JsonResponse:
    selected = checks()
    wanted = request.GET.getlist("check")
    unknown = sorted(set(wanted) - selected.keys())
    if unknown:
        return JsonResponse(
            {"status": "error", "error": f"unknown checks {unknown}; known: {sorted(selected)}"}, status=400
        )
    return {name: check for name, check in selected.items() if name in wanted} if wanted else selected


@never_cache
@require_GET
def health(request):
    """Liveness: every check's ok or error, or only those named by `?check=` (a healthcheck asks for what it needs)."""
    selected = selected_checks(request)
    if isinstance(selected, JsonResponse):
        return selected
    results = _cache.results_of(selected)
    healthy = all(result["status"] == "ok" for result in results.values())
    answer = {"status": "ok" if healthy else "error", "checks": {name: r["status"] for name, r in results.items()}}
    return JsonResponse(answer, status=200 if healthy else 503)


@never_cache
@require_GET
def health_detail(request):
    """As /health, with each check's error, latency and age, and the alerts: for operators only."""
    if not is_operator(request):
        return refuse()
    selected = selected_checks(request)
    if isinstance(selected, JsonResponse):
        return selected
    results = _cache.results_of(selected)
    healthy = all(result["status"] == "ok" for result in results.values())
    answer: dict[str, object] = {"status": "ok" if healthy else "error", "checks": results}
    if results.get("database", {}).get("status") == "ok":
        answer["alerts"] = alerts()
    return JsonResponse(answer, status=200 if healthy else 503)


def alerts() -> dict:
    """What an operator must look at although every service answers: never a reason for a 503."""
    unreadable = ClusterJob.objects.live().exclude(unreadable_state="")
    return {
        "unreadable_jobs": [
            {
                "job": job.id,
                "slurm_job_id": job.slurm_job_id,
                "state": job.unreadable_state,
                "since": job.unreadable_since.isoformat() if job.unreadable_since else None,
            }
            for job in unreadable[:20]
        ],
        "jobs_waiting_out_sbatch_errors": ClusterJob.objects.declared().exclude(submit_error="").count(),
    }


@never_cache
@require_GET
def metrics(request):
    """The Prometheus exposition of emg.metrics, read from the database now."""
    if not is_operator(request):
        return refuse()
    return HttpResponse(generate_latest(registry()), content_type=CONTENT_TYPE_LATEST)
