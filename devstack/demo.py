"""`python -m devstack.demo` (what `make demo` runs): the whole local stack and one demo request.

Starts a Prefect server, the Prefect runner, a Celery dispatch worker, a tick worker and beat,
Flower and the Django dev server (devstack.Stack); creates an analysis request; prints its
progress until it ends. Ctrl-C stops everything it started. With DEMO_ONCE=1 it stops after the
demo request ends and exits 0 only if the request COMPLETED.
"""

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "emg.settings")
# The demo is a developer's stack on localhost: debug pages and the demo's secret key, unless the
# environment says otherwise (the product's default is DEBUG off, and then a key of your own).
os.environ.setdefault("DJANGO_DEBUG", "1")
django.setup()

from django.conf import settings  # noqa: E402  (needs django.setup())
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402

from devstack.ena_fake import FakeEnaServer  # noqa: E402
from devstack.processes import ROOT, ManagedProcess  # noqa: E402
from devstack.services import start_prefect_server  # noqa: E402
from devstack.stack import Stack  # noqa: E402
from emg.models import AnalysisRequest, JobWait, Study  # noqa: E402

# A recorded study: the demo serves ENA's answers for it from a local fake of the Portal API.
DEMO_STUDY = "PRJEB40001"


class DemoError(Exception):
    """The demo could not run, or its request did not complete: said in one line, exit status 1."""


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def slurm_answers() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def say(line: str) -> None:
    print(line, flush=True)


class Demo:
    def run(self) -> None:
        once = os.environ.get("DEMO_ONCE") == "1"
        var_dir = Path(settings.VAR_DIR)
        log_dir = var_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        ports = {
            "web": int(os.environ.get("DEMO_WEB_PORT", 8000)),
            "flower": int(os.environ.get("DEMO_FLOWER_PORT", 5555)),
        }
        busy = [f"{name} ({port})" for name, port in ports.items() if port_in_use(port)]
        if port_in_use(int(settings.PREFECT_API_URL.rsplit(":", 1)[1].split("/")[0])):
            busy.append(f"Prefect ({settings.PREFECT_API_URL})")
        if busy:
            raise DemoError(f"ports already in use: {', '.join(busy)}; stop what runs there or set DEMO_*_PORT")

        backend = self.choose_backend()
        ena = self.local_ena()
        env = self.stack_environment(var_dir, backend, ena)
        # This process talks to the same Prefect server (and must not start an ephemeral one).
        os.environ.update(env)
        call_command("migrate", interactive=False, verbosity=0)
        admin_password = self.ensure_admin()
        flower_auth = os.environ.get("FLOWER_BASIC_AUTH") or f"demo:{secrets.token_urlsafe(9)}"

        stop_requested = False

        def request_stop(*_):
            nonlocal stop_requested
            stop_requested = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        server: ManagedProcess | None = None
        stack = Stack(env, log_dir, flower_port=ports["flower"], flower_auth=flower_auth, web_port=ports["web"])
        final = None
        try:
            say("starting the Prefect server (SQLite, under var/prefect) ...")
            server = start_prefect_server(env, log_dir, settings.PREFECT_API_URL)
            stack.start()

            say("\nThe stack is up:")
            say(f"  Django admin  http://127.0.0.1:{ports['web']}/admin/  (user admin, {admin_password})")
            say(f"  Prefect UI    {settings.PREFECT_UI_URL}")
            say(f"  Flower        http://127.0.0.1:{ports['flower']}/  (basic auth {flower_auth})")
            say(f"  Logs          {log_dir}/\n")

            study, _ = Study.objects.get_or_create(accession=DEMO_STUDY)
            request = AnalysisRequest.objects.create(study=study)
            say(f"created analysis request #{request.id} for {study.accession}")
            final = self.follow(request, stack, lambda: stop_requested, stop_when_final=once)
        finally:
            say("stopping the stack ...")
            stack.stop()
            if server is not None:
                server.stop()
            if ena is not None:
                ena.stop()
        if once and final != AnalysisRequest.Status.COMPLETED:
            raise DemoError(f"the demo request ended {final}")

    def choose_backend(self) -> str:
        if os.environ.get("EMG_CLUSTER_BACKEND", "auto") == "local":
            return "local"
        if subprocess.run(["sh", "-c", "command -v sbatch"], capture_output=True).returncode != 0:
            say(
                "sbatch is not installed here: jobs run as local processes behind the same interface "
                "(`make slurm-up` installs and starts a single-node Slurm cluster)."
            )
            return "local"
        if not slurm_answers():
            say("Slurm is installed but not answering: starting it with scripts/slurm-up.sh ...")
            subprocess.run(["bash", str(ROOT / "scripts" / "slurm-up.sh")], check=True)
        if os.environ.get("EMG_CLUSTER_BACKEND") == "slurmrestd":
            say(f"using the real Slurm cluster through slurmrestd at {settings.EMG_SLURMRESTD_URL}")
            return "slurmrestd"
        say("using the real Slurm cluster")
        return "slurm"

    def local_ena(self):
        """A local fake of ENA's Portal API with recorded studies, unless EMG_ENA_PORTAL_API names a real one."""
        if "EMG_ENA_PORTAL_API" in os.environ:
            return None
        server = FakeEnaServer()
        server.start()
        say(f"serving recorded ENA answers at {server.base_url} (set EMG_ENA_PORTAL_API for the real one)")
        return server

    def stack_environment(self, var_dir: Path, backend: str, ena) -> dict[str, str]:
        prefect_home = var_dir / "prefect"
        env = dict(os.environ)
        if ena is not None:
            env.update(EMG_ENA_PORTAL_API=ena.base_url, EMG_ENA_FASTQ_URL_PREFIX=ena.fastq_url_prefix)
        env.update(
            DJANGO_SETTINGS_MODULE="emg.settings",
            EMG_CLUSTER_BACKEND=backend,
            REDIS_URL=settings.REDIS_URL,
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

    def follow(self, request: AnalysisRequest, stack: Stack, stop_requested, *, stop_when_final: bool) -> str:
        last_line = ""
        while not stop_requested():
            request.refresh_from_db()
            wait = JobWait.objects.filter(request=request).select_related("job").order_by("-created_at").first()
            job_part = f"{wait.step} job {wait.job.slurm_job_id or '-'} {wait.job.state}" if wait else "no job yet"
            line = f"request #{request.id}: {request.status} {request.current_step} | {job_part}"
            if line != last_line:
                say(f"{time.strftime('%H:%M:%S')} {line}")
                last_line = line
            if request.status in AnalysisRequest.FINAL_STATUSES:
                if request.status_reason:
                    say(f"  {request.status_reason}")
                if stop_when_final:
                    return request.status
                say("the demo request has ended; the stack keeps running until Ctrl-C")
                while not stop_requested():
                    time.sleep(0.5)
                return request.status
            dead = [process.name for process in stack.exited()]
            if dead:
                raise DemoError(f"stopped unexpectedly: {', '.join(dead)} (see {stack.log_dir})")
            time.sleep(1)
        return request.status


def main() -> int:
    try:
        Demo().run()
    except DemoError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
