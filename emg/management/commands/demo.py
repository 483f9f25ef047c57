"""`python manage.py demo` (what `make demo` runs): the whole local stack and one demo request.

Starts a Prefect server, the Prefect runner, a Celery worker and beat, Flower and the Django
dev server; creates an analysis request; prints its progress until it ends. Ctrl-C stops
everything it started. With DEMO_ONCE=1 it stops after the demo request ends and exits 0
only if the request COMPLETED.
"""

import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import BaseCommand, CommandError, call_command

from emg.models import AnalysisRequest, JobWait, Study
from emg.processes import ROOT, ManagedProcess, python_module, start_prefect_server, venv_script, wait_until

# A recorded study: the demo serves ENA's answers for it from a local fake of the Portal API.
DEMO_STUDY = "PRJEB40001"


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def slurm_answers() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Command(BaseCommand):
    help = "Run the local demo stack and one analysis request through it."

    def handle(self, *args, **options):
        once = os.environ.get("DEMO_ONCE") == "1"
        var_dir = Path(settings.VAR_DIR)
        log_dir = var_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        ports = {"web": int(os.environ.get("DEMO_WEB_PORT", 8000)), "flower": int(os.environ.get("DEMO_FLOWER_PORT", 5555))}
        busy = [f"{name} ({port})" for name, port in ports.items() if port_in_use(port)]
        if port_in_use(int(settings.PREFECT_API_URL.rsplit(":", 1)[1].split("/")[0])):
            busy.append(f"Prefect ({settings.PREFECT_API_URL})")
        if busy:
            raise CommandError(f"ports already in use: {', '.join(busy)}; stop what runs there or set DEMO_*_PORT")

        backend = self.choose_backend()
        ena = self.local_ena()
        env = self.stack_environment(var_dir, backend, ena)
        # This process talks to the same Prefect server (and must not start an ephemeral one).
        os.environ.update(env)
        call_command("migrate", interactive=False, verbosity=0)
        admin_password = self.ensure_admin()
        flower_auth = os.environ.get("FLOWER_BASIC_AUTH") or f"demo:{secrets.token_urlsafe(9)}"

        processes: list[ManagedProcess] = []
        stop_requested = False

        def request_stop(*_):
            nonlocal stop_requested
            stop_requested = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        try:
            self.stdout.write("starting the Prefect server (SQLite, under var/prefect) ...")
            processes.append(start_prefect_server(env, log_dir, settings.PREFECT_API_URL))
            celery = venv_script("celery")
            for name, argv, extra in (
                ("prefect-runner", python_module("flows.serve"), {}),
                ("celery-worker", [celery, "-A", "workers", "worker", "-l", "INFO", "--concurrency", "2"], {}),
                ("celery-beat", [celery, "-A", "workers", "beat", "-l", "INFO", "--schedule",
                                 str(var_dir / "celerybeat-schedule")], {}),
                ("flower", [celery, "-A", "workers", "flower", f"--port={ports['flower']}", "--address=127.0.0.1"],
                 {"FLOWER_BASIC_AUTH": flower_auth}),
                ("web", python_module("django", "runserver", "--noreload", f"127.0.0.1:{ports['web']}"), {}),
            ):
                processes.append(ManagedProcess(name, argv, env={**env, **extra}, log_dir=log_dir).start())
            self.wait_for_stack(processes, ports)

            self.stdout.write(self.style.SUCCESS("\nThe stack is up:"))
            self.stdout.write(f"  Django admin  http://127.0.0.1:{ports['web']}/admin/  (user admin, {admin_password})")
            self.stdout.write(f"  Prefect UI    {settings.PREFECT_UI_URL}")
            self.stdout.write(f"  Flower        http://127.0.0.1:{ports['flower']}/  (basic auth {flower_auth})")
            self.stdout.write(f"  Logs          {log_dir}/\n")

            study, _ = Study.objects.get_or_create(accession=DEMO_STUDY)
            request = AnalysisRequest.objects.create(study=study)
            self.stdout.write(f"created analysis request #{request.id} for {study.accession}")
            final = self.follow(request, processes, lambda: stop_requested, stop_when_final=once)
        finally:
            self.stdout.write("stopping the stack ...")
            for process in reversed(processes):
                process.stop()
            if ena is not None:
                ena.stop()
        if once and final != AnalysisRequest.Status.COMPLETED:
            raise CommandError(f"the demo request ended {final}")

    def choose_backend(self) -> str:
        if os.environ.get("EMG_CLUSTER_BACKEND", "auto") == "local":
            return "local"
        if subprocess.run(["sh", "-c", "command -v sbatch"], capture_output=True).returncode != 0:
            self.stdout.write(self.style.WARNING(
                "sbatch is not installed here: jobs run as local processes behind the same interface "
                "(`make slurm-up` installs and starts a single-node Slurm cluster)."
            ))
            return "local"
        if not slurm_answers():
            self.stdout.write("Slurm is installed but not answering: starting it with scripts/slurm-up.sh ...")
            subprocess.run(["bash", str(ROOT / "scripts" / "slurm-up.sh")], check=True)
        if os.environ.get("EMG_CLUSTER_BACKEND") == "slurmrestd":
            self.stdout.write(f"using the real Slurm cluster through slurmrestd at {settings.EMG_SLURMRESTD_URL}")
            return "slurmrestd"
        self.stdout.write("using the real Slurm cluster")
        return "slurm"

    def local_ena(self):
        """A local fake of ENA's Portal API with recorded studies, unless EMG_ENA_PORTAL_API names a real one."""
        if "EMG_ENA_PORTAL_API" in os.environ:
            return None
        from flows.ena_fake import FakeEnaServer

        server = FakeEnaServer()
        server.start()
        self.stdout.write(f"serving recorded ENA answers at {server.base_url} (set EMG_ENA_PORTAL_API for the real one)")
        return server

    def stack_environment(self, var_dir: Path, backend: str, ena) -> dict[str, str]:
        prefect_home = var_dir / "prefect"
        env = dict(os.environ)
        if ena is not None:
            env.update(EMG_ENA_PORTAL_API=ena.base_url, EMG_ENA_FASTQ_URL_PREFIX=ena.fastq_url_prefix)
        env.update(
            DJANGO_SETTINGS_MODULE="emg.settings",
            EMG_CLUSTER_BACKEND=backend,
            EMG_RECONCILE_INTERVAL_SECONDS=env.get("EMG_RECONCILE_INTERVAL_SECONDS", "2"),
            PREFECT_API_URL=settings.PREFECT_API_URL,
            PREFECT_HOME=str(prefect_home),
            PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(prefect_home / "results"),
            PREFECT_RUNNER_POLL_FREQUENCY="1",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1",
        )
        return env

    def ensure_admin(self) -> str:
        password = os.environ.get("DEMO_ADMIN_PASSWORD") or secrets.token_urlsafe(9)
        admin, _ = get_user_model().objects.get_or_create(
            username="admin", defaults={"is_staff": True, "is_superuser": True}
        )
        admin.set_password(password)
        admin.save()
        return f"password {password}"

    def wait_for_stack(self, processes: list[ManagedProcess], ports: dict[str, int]) -> None:
        from prefect.client.orchestration import get_client

        from flows.deployments import ANALYSIS_DEPLOYMENT
        from workers import app

        def all_alive():
            dead = [process for process in processes if not process.running]
            if dead:
                raise CommandError("\n".join(f"{p.name} exited:\n{p.log_tail()}" for p in dead))
            return True

        def deployment_served():
            all_alive()
            with get_client(sync_client=True) as client:
                return client.read_deployment_by_name(ANALYSIS_DEPLOYMENT)

        wait_until(deployment_served, timeout=120, interval=1, message="the Prefect runner serves its deployment")
        wait_until(lambda: all_alive() and app.control.ping(timeout=1), timeout=60, message="Celery answers")
        wait_until(lambda: all_alive() and httpx.get(f"http://127.0.0.1:{ports['web']}/admin/login/").is_success,
                   timeout=60, message="the Django server answers")

    def follow(self, request: AnalysisRequest, processes, stop_requested, *, stop_when_final: bool) -> str:
        last_line = ""
        while not stop_requested():
            request.refresh_from_db()
            wait = JobWait.objects.filter(request=request).select_related("job").order_by("-created_at").first()
            job_part = f"{wait.step} job {wait.job.slurm_job_id or '-'} {wait.job.state}" if wait else "no job yet"
            line = f"request #{request.id}: {request.status} {request.current_step} | {job_part}"
            if line != last_line:
                self.stdout.write(f"{time.strftime('%H:%M:%S')} {line}")
                last_line = line
            if request.status in AnalysisRequest.FINAL_STATUSES:
                if request.status_reason:
                    self.stdout.write(f"  {request.status_reason}")
                if stop_when_final:
                    return request.status
                self.stdout.write("the demo request has ended; the stack keeps running until Ctrl-C")
                while not stop_requested():
                    time.sleep(0.5)
                return request.status
            dead = [process.name for process in processes if not process.running]
            if dead:
                raise CommandError(f"stopped unexpectedly: {', '.join(dead)} (see {processes[0].log_path.parent})")
            time.sleep(1)
        return request.status
