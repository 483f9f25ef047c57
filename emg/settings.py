"""Settings come from the environment; every one has a default that runs the local demo."""

import getpass
import os
import re
import warnings
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("EMG_VAR_DIR", BASE_DIR / "var"))


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _env_flag(name: str, default: bool) -> bool:
    return os.environ.get(name, "1" if default else "0") == "1"


def _env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


# --- Django security: safe unless asked otherwise ---------------------------------------------
# A debug page shows settings, the request and the process environment: DEBUG is on only when asked
# for (DJANGO_DEBUG=1, as `make demo` does).
DEBUG = _env_flag("DJANGO_DEBUG", False)
# The key signs sessions and password-reset links: a public default is acceptable only in debug mode.
DEMO_SECRET_KEY = "insecure-demo-key-set-DJANGO_SECRET_KEY-in-production"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or DEMO_SECRET_KEY
if not DEBUG and SECRET_KEY == DEMO_SECRET_KEY:
    raise ImproperlyConfigured(
        "DJANGO_SECRET_KEY is not set: with DJANGO_DEBUG off (the default) a secret key of your own is required "
        "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(50))'); DJANGO_DEBUG=1 runs the demo's key"
    )
ALLOWED_HOSTS = _env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
# Behind the usual TLS-terminating proxy: the origins users reach the admin at (https://emg.example.org)
# and, if the proxy sets X-Forwarded-Proto, trust in that header (only if the proxy overwrites it).
CSRF_TRUSTED_ORIGINS = _env_list("DJANGO_CSRF_TRUSTED_ORIGINS")
if _env_flag("DJANGO_SECURE_PROXY_SSL_HEADER", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Served over HTTPS (the default outside debug mode): plain HTTP is redirected, cookies are sent only
# over TLS and browsers are told to keep to HTTPS. DJANGO_HTTPS=0 for a plain-HTTP deployment on a
# trusted network. The monitoring endpoints stay reachable over plain HTTP, for probes inside it.
HTTPS = _env_flag("DJANGO_HTTPS", not DEBUG)
SECURE_SSL_REDIRECT = HTTPS
SECURE_REDIRECT_EXEMPT = [r"^health(/|$)", r"^metrics$"]
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SECURE_HSTS_SECONDS = _env_int("DJANGO_SECURE_HSTS_SECONDS", 31536000 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = _env_flag("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
SECURE_HSTS_PRELOAD = _env_flag("DJANGO_SECURE_HSTS_PRELOAD", False)
# check --deploy warns whenever preload is off; asking browsers to preload is the domain owner's
# decision (and hard to take back), so it stays opt-in and that one warning is not shown.
SILENCED_SYSTEM_CHECKS = [] if SECURE_HSTS_PRELOAD else ["security.W021"]
# Error reports (and a debug page, where asked for) mask connection URLs too, not only Django's
# default names: DATABASE_URL and REDIS_URL carry passwords.
DEFAULT_EXCEPTION_REPORTER_FILTER = "emg.error_reports.ConnectionUrlsMasked"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "emg.apps.EmgConfig",
    "workers",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # The admin's CSS and scripts, served by the app (gzip, far-future caching of collected files)
    # under any WSGI server, with DEBUG off.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "emg.urls"
WSGI_APPLICATION = "emg.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{VAR_DIR / 'emg.sqlite3'}"),
        # Flows and the reconciler live for days: let Django check a connection
        # before reusing it instead of failing on one the server dropped.
        conn_max_age=_env_int("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}

# Flows and the runner have no request cycle to run Django's health checks: this backend checks a
# connection idle for more than this before its next use (outside transactions) and, after a server
# restart, waits this long for the server to take connections again (emg/postgresql/base.py).
EMG_DATABASE_IDLE_CHECK_SECONDS = _env_float("EMG_DATABASE_IDLE_CHECK_SECONDS", 1)
EMG_DATABASE_RECONNECT_SECONDS = _env_float("EMG_DATABASE_RECONNECT_SECONDS", 30)
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"]["ENGINE"] = "emg.postgresql"

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The demo's SQLite file is shared by the web server, Celery and every flow process:
    # WAL lets readers run beside the writer, and IMMEDIATE transactions queue writers
    # up front instead of failing with "database is locked" halfway through.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-gb"
STATIC_URL = "static/"
# `manage.py collectstatic` fills it (the app image does at build time); until then WhiteNoise finds
# the files where the apps keep them, so an install that never collected still has the admin's CSS.
STATIC_ROOT = VAR_DIR / "static"
WHITENOISE_USE_FINDERS = True
# ...and it says, once per process, that the directory is not there yet: expected, not a fault.
warnings.filterwarnings("ignore", message="No directory at: ")

# --- Event path: Redis carries events from the database to Celery -------------
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", REDIS_URL)
# The modules that declare triggers (emg.triggers): which model changes start which deployments.
EMG_TRIGGER_MODULES = ["flows.triggers"]
# Deployments the runner (flows.serve) serves that no trigger starts, e.g. those other flows start
# as child flows (flows.child_flows): "<flow name>/<deployment name>" to the flow's dotted path.
EMG_SERVED_DEPLOYMENTS: dict[str, str] = {}
# Which runner serves which deployment: each runner (python -m flows.serve) belongs to one group,
# EMG_RUNNER_GROUP, and serves the deployments routed to it; unrouted ones are the "default" group's.
# EMG_RUNNER_ROUTES routes them, e.g. "move-results/datamove=data-mover" (comma-separated pairs), so
# data-mover flows run only on a runner started with EMG_RUNNER_GROUP=data-mover on that host.
EMG_RUNNER_GROUP = os.environ.get("EMG_RUNNER_GROUP", "default")
EMG_RUNNER_ROUTES: dict[str, str] = {}
for _route in _env_list("EMG_RUNNER_ROUTES"):
    _deployment, _equals, _group = (part.strip() for part in _route.partition("="))
    if not (_deployment and _equals and _group):
        raise ImproperlyConfigured(f"EMG_RUNNER_ROUTES: {_route!r} is not '<flow>/<deployment>=<runner group>'")
    EMG_RUNNER_ROUTES[_deployment] = _group
# An event not dispatched within this many seconds is published again by the sweep.
EMG_OUTBOX_GRACE_SECONDS = _env_float("EMG_OUTBOX_GRACE_SECONDS", 30)
EMG_OUTBOX_SWEEP_SECONDS = _env_float("EMG_OUTBOX_SWEEP_SECONDS", 15)
# A dispatch task retries this many times (backoff 2 s doubling to 60 s), then gives the event
# back to the sweep, which publishes it again only when no task of it is in flight.
EMG_DISPATCH_MAX_RETRIES = _env_int("EMG_DISPATCH_MAX_RETRIES", 6)
# A task recorded in flight for longer than this is taken for lost, and its event published again.
EMG_OUTBOX_IN_FLIGHT_MAX_SECONDS = _env_float("EMG_OUTBOX_IN_FLIGHT_MAX_SECONDS", 3600)
# Prefect idempotency keys must be unique across every database that talks to the
# same Prefect server, or a key from another database returns that database's run.
# They also name cache files, so only letters, digits and dashes.
EMG_INSTANCE_NAMESPACE = os.environ.get(
    "EMG_INSTANCE_NAMESPACE", re.sub(r"[^a-z0-9]+", "-", str(DATABASES["default"]["NAME"]).lower()).strip("-")
)
# Celery queues carry the namespace too, so two instances on one Redis never take each other's
# tasks. Dispatch (outbox events, the sweep) and the reconcile tick have a queue each, consumed
# by workers of their own (workers.celery, EMG_WORKER_ROLES): a dispatch backlog (a burst of
# saves, Prefect down) never delays reconciliation, which needs no Prefect to track Slurm work.
EMG_DISPATCH_QUEUE = f"emg.{EMG_INSTANCE_NAMESPACE}.dispatch"
EMG_RECONCILE_QUEUE = f"emg.{EMG_INSTANCE_NAMESPACE}.reconcile"

# --- Prefect -------------------------------------------------------------------
PREFECT_API_URL = os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api")
PREFECT_UI_URL = os.environ.get("PREFECT_UI_URL", PREFECT_API_URL.removesuffix("/api"))
# A suspended flow waits for a cluster job that can pend for days and run for more:
# its suspension must outlive the longest job, or Prefect fails the run underneath it.
EMG_SUSPEND_TIMEOUT_SECONDS = _env_int("EMG_SUSPEND_TIMEOUT_SECONDS", 30 * 24 * 3600)

# --- Cluster -----------------------------------------------------------------------
EMG_CLUSTER_BACKEND = os.environ.get("EMG_CLUSTER_BACKEND", "auto")  # slurm | slurmrestd | local | auto
# The slurmrestd backend: where, which API version ("auto": the newest both sides support), and
# whose JWT. A token file is re-read whenever it changes, so a renewer can rotate it underneath us;
# the token itself never reaches the database, the logs or a job.
EMG_SLURMRESTD_URL = os.environ.get("EMG_SLURMRESTD_URL", "http://127.0.0.1:6820")
EMG_SLURMRESTD_API_VERSION = os.environ.get("EMG_SLURMRESTD_API_VERSION", "auto")
EMG_SLURMRESTD_USER = os.environ.get("EMG_SLURMRESTD_USER") or getpass.getuser()
EMG_SLURMRESTD_TOKEN = os.environ.get("EMG_SLURMRESTD_TOKEN") or None
EMG_SLURMRESTD_TOKEN_FILE = os.environ.get("EMG_SLURMRESTD_TOKEN_FILE") or None
EMG_SLURMRESTD_TIMEOUT_SECONDS = _env_float("EMG_SLURMRESTD_TIMEOUT_SECONDS", 30)
EMG_SLURMRESTD_RETRIES = _env_int("EMG_SLURMRESTD_RETRIES", 2)
EMG_WORK_DIR = Path(os.environ.get("EMG_WORK_DIR", VAR_DIR / "work"))
EMG_SLURM_PARTITION = os.environ.get("EMG_SLURM_PARTITION") or None
EMG_SLURM_MIN_QUERY_INTERVAL_SECONDS = _env_float("EMG_SLURM_MIN_QUERY_INTERVAL_SECONDS", 0)
EMG_SLURM_ACCOUNTING_GRACE_SECONDS = _env_float("EMG_SLURM_ACCOUNTING_GRACE_SECONDS", 60)
EMG_PIPELINE_TIME_LIMIT_MINUTES = _env_int("EMG_PIPELINE_TIME_LIMIT_MINUTES", 60)
EMG_PIPELINE_MEMORY_MB = _env_int("EMG_PIPELINE_MEMORY_MB", 512)

# --- Reconciler (Celery beat) -------------------------------------------------------
EMG_RECONCILE_INTERVAL_SECONDS = _env_float("EMG_RECONCILE_INTERVAL_SECONDS", 10)
# A claimed submission whose answer never came is looked up by its tag (and, if Slurm does not
# know it, superseded) only after this long: longer than sbatch may take before we kill it.
EMG_SUBMIT_CLAIM_LEASE_SECONDS = _env_float("EMG_SUBMIT_CLAIM_LEASE_SECONDS", 180)
# Resumes per tick start here and adapt (workers.reconcile.resume_pace): doubled after a tick that
# used them all, up to the ceiling; halved when Prefect answers 429/5xx or times out.
EMG_RESUMES_PER_TICK = _env_int("EMG_RESUMES_PER_TICK", 20)
EMG_RESUMES_PER_TICK_MAX = _env_int("EMG_RESUMES_PER_TICK_MAX", 2000)
EMG_RESUME_CONCURRENCY = _env_int("EMG_RESUME_CONCURRENCY", 8)
# History the tick no longer reads is deleted this long after it ended (0 keeps it for ever): waits
# released, and run events dispatched, for requests that have ended or moved to a later generation.
# At most EMG_PRUNE_BATCH rows of each kind per tick, so a first prune of a large backlog is spread out.
EMG_PRUNE_AFTER_DAYS = _env_float("EMG_PRUNE_AFTER_DAYS", 30)
EMG_PRUNE_BATCH = _env_int("EMG_PRUNE_BATCH", 5000)

from emg.log import LOGGING, LOGGING_CONFIG  # noqa: E402,F401  (one masked JSON-lines format everywhere)

# --- Pre-cluster delay: never flood the cluster ---------------------------------------
# Declared jobs wait (never fail) while this many of ours are pending or running.
EMG_MAX_ACTIVE_JOBS = _env_int("EMG_MAX_ACTIVE_JOBS", 100)
# Submissions per minute, whatever the room under EMG_MAX_ACTIVE_JOBS.
EMG_MAX_SUBMISSIONS_PER_MINUTE = _env_int("EMG_MAX_SUBMISSIONS_PER_MINUTE", 6)
# Declared jobs of one shape (same resources and options) at least this many are submitted as one
# Slurm job array (one sbatch, counted as one submission above); 0 submits every job on its own.
EMG_ARRAY_MIN_TASKS = _env_int("EMG_ARRAY_MIN_TASKS", 10)
# The most tasks of one array (Slurm's MaxArraySize, 1001 by default, allows indices up to 1000).
EMG_ARRAY_MAX_TASKS = _env_int("EMG_ARRAY_MAX_TASKS", 1000)

# --- Crashed and zombie flow runs ------------------------------------------------------------
# Flow runs send a heartbeat this often while they run (Prefect's minimum is 30 s); a suspended
# run sends none, and is never taken for a zombie.
EMG_FLOW_HEARTBEAT_SECONDS = _env_int("EMG_FLOW_HEARTBEAT_SECONDS", 30)
# A run Running this long with no heartbeat in that time is a zombie (its process is gone).
EMG_ZOMBIE_AFTER_SECONDS = _env_float("EMG_ZOMBIE_AFTER_SECONDS", 3 * EMG_FLOW_HEARTBEAT_SECONDS)
EMG_MAX_FLOW_RERUNS = _env_int("EMG_MAX_FLOW_RERUNS", 3)
# The runner renews a lease for each flow-run process it holds this often: a run with no heartbeat
# whose lease is fresh (renewed within EMG_ZOMBIE_AFTER_SECONDS) is alive but silent (SIGSTOPped,
# swapped out) and would continue; it is not re-run. Less than half the zombie threshold.
EMG_FLOW_LEASE_RENEW_SECONDS = _env_float("EMG_FLOW_LEASE_RENEW_SECONDS", 5)
# At most this many flow-run processes per runner at once; more runs wait, Scheduled, for a slot.
EMG_RUNNER_LIMIT = _env_int("EMG_RUNNER_LIMIT", 8)

# --- ENA and the MGnify flow -----------------------------------------------------------------
EMG_ENA_PORTAL_API = os.environ.get("EMG_ENA_PORTAL_API", "https://www.ebi.ac.uk/ena/portal/api")
# Read files are named by ENA as host/path ("ftp.sra.ebi.ac.uk/vol1/..."); this makes them URLs.
EMG_ENA_FASTQ_URL_PREFIX = os.environ.get("EMG_ENA_FASTQ_URL_PREFIX", "https://")
EMG_ENA_TIMEOUT_SECONDS = _env_float("EMG_ENA_TIMEOUT_SECONDS", 60)
EMG_ENA_RETRIES = _env_int("EMG_ENA_RETRIES", 4)
EMG_ENA_RETRY_DELAY_SECONDS = _env_float("EMG_ENA_RETRY_DELAY_SECONDS", 10)
# A first fetch that still meets an outage after those retries is not a verdict on the study: the
# flow run ends and the reconciler runs it again this long later (doubling up to the maximum),
# holding no process meanwhile, and only after this many deferrals does the request fail.
EMG_ENA_DEFER_SECONDS = _env_float("EMG_ENA_DEFER_SECONDS", 300)
EMG_ENA_DEFER_MAX_SECONDS = _env_float("EMG_ENA_DEFER_MAX_SECONDS", 3600)
EMG_ENA_MAX_DEFERRALS = _env_int("EMG_ENA_MAX_DEFERRALS", 48)
# In production these are Nextflow pipelines, e.g.
#   "nextflow run ebi-metagenomics/miassembler -r v3.0.0 -resume -ansi-log false -with-trace"
EMG_ASSEMBLY_COMMAND = os.environ.get("EMG_ASSEMBLY_COMMAND", f"python3 {BASE_DIR / 'pipelines' / 'assembly.py'}")
EMG_ANALYSIS_COMMAND = os.environ.get("EMG_ANALYSIS_COMMAND", f"python3 {BASE_DIR / 'pipelines' / 'analysis.py'}")
EMG_DATAMOVE_COMMAND = os.environ.get("EMG_DATAMOVE_COMMAND", f"bash {BASE_DIR / 'pipelines' / 'datamove.sh'}")
EMG_DATAMOVER_PARTITION = os.environ.get("EMG_DATAMOVER_PARTITION") or None
EMG_RESULTS_DIR = Path(os.environ.get("EMG_RESULTS_DIR", VAR_DIR / "results"))
# Analysis runs only on an assembly at least this long (total contig bases).
EMG_MIN_ASSEMBLY_LENGTH = _env_int("EMG_MIN_ASSEMBLY_LENGTH", 5000)
# Raw-reads QC (flows.read_qc): one job per run; a run passes with at least this many reads and
# this share of its bases at Phred quality 30 or more.
EMG_READ_QC_COMMAND = os.environ.get("EMG_READ_QC_COMMAND", f"python3 {BASE_DIR / 'pipelines' / 'read_qc.py'}")
EMG_QC_MIN_READS = _env_int("EMG_QC_MIN_READS", 100)
EMG_QC_MIN_Q30_PERCENT = _env_float("EMG_QC_MIN_Q30_PERCENT", 80)

# --- Monitoring -------------------------------------------------------------------------------
# /health answers from check results at most this old: a burst of callers shares one run of each.
EMG_HEALTH_CACHE_SECONDS = _env_float("EMG_HEALTH_CACHE_SECONDS", 5)
# A bearer token for /metrics and /health/detail (Prometheus's `authorization: credentials`),
# besides a staff login; unset, only staff see them. Set it from a secret store, never in a file here.
EMG_MONITORING_TOKEN = os.environ.get("EMG_MONITORING_TOKEN", "")
# Jobs using less than this share of the CPU, memory or time they requested are flagged in the
# admin's efficiency report.
EMG_EFFICIENCY_THRESHOLD = _env_float("EMG_EFFICIENCY_THRESHOLD", 0.5)
