"""compose.yaml: validated and inspected offline through `docker-compose config`.

No Docker engine, no database and no Django are needed: compose only resolves the file.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"

SERVICES = {
    "postgres",
    "redis",
    "prefect-server",
    "prefect-worker",
    "celery-worker",
    "celery-tick-worker",
    "celery-beat",
    "flower",
    "web",
    "slurm",
}
# Processes of our own code that need the database and the broker.
APP_SERVICES = {"web", "celery-worker", "celery-tick-worker", "celery-beat", "prefect-worker"}
CELERY_SERVICES = {"celery-worker", "celery-tick-worker", "celery-beat"}

# Dummy secrets, distinctive enough that finding one anywhere means it was put there.
PG_PASSWORD = "dummy-pg-password-7f3a9c"
DJANGO_SECRET = "dummy-django-secret-91c2e4"
FLOWER_AUTH = "dummy-flower-user:dummy-flower-password-55e1b8"
REDIS_PASSWORD = "dummy-redis-password-3d8b07"
PREFECT_AUTH = "dummy-prefect-user:dummy-prefect-password-a4c6f1"
REQUIRED_ENV = {
    "POSTGRES_PASSWORD": PG_PASSWORD,
    "DJANGO_SECRET_KEY": DJANGO_SECRET,
    "FLOWER_BASIC_AUTH": FLOWER_AUTH,
    "REDIS_PASSWORD": REDIS_PASSWORD,
    "PREFECT_API_AUTH_STRING": PREFECT_AUTH,
}


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    """Runs `<compose> config ARGS` with exactly the given variables (no .env, no host environment)."""
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker-compose` nor `docker compose` is installed (CI installs docker-compose)")
    # An empty env file, so a developer's .env cannot supply (or hide) a variable.
    env_file = tmp_path_factory.mktemp("compose") / "empty.env"
    env_file.write_text("")

    def run(variables: dict[str, str], *args: str) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(env_file.parent), **variables}
        return subprocess.run(
            [
                *command,
                "--env-file",
                str(env_file),
                "--project-directory",
                str(ROOT),
                "-f",
                str(COMPOSE_FILE),
                "config",
                *args,
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


@pytest.fixture(scope="module")
def config(compose) -> dict:
    result = compose(REQUIRED_ENV)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def services(config) -> dict:
    return config["services"]


def test_config_is_valid_with_the_required_variables(compose):
    result = compose(REQUIRED_ENV, "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("missing", sorted(REQUIRED_ENV))
def test_config_refuses_to_run_without_a_required_variable(compose, missing):
    variables = {name: value for name, value in REQUIRED_ENV.items() if name != missing}
    result = compose(variables, "-q")
    assert result.returncode != 0, f"compose accepted the file without {missing}"
    assert missing in result.stderr + result.stdout


def test_exactly_the_expected_services(services):
    assert set(services) == SERVICES


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_complete_healthcheck(services, name):
    healthcheck = services[name].get("healthcheck")
    assert healthcheck, f"{name} has no healthcheck"
    assert not healthcheck.get("disable"), f"{name} disables its healthcheck"
    test = healthcheck["test"]
    assert test and test[0] in {"CMD", "CMD-SHELL"} and len(test) > 1, test
    for field in ("interval", "timeout", "retries", "start_period"):
        assert field in healthcheck, f"{name} healthcheck lacks {field}"


def conditions(services, name) -> dict[str, str]:
    depends_on = services[name].get("depends_on") or {}
    assert isinstance(depends_on, dict), f"{name}: depends_on must name conditions"
    return {dependency: spec["condition"] for dependency, spec in depends_on.items()}


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_app_services_wait_for_a_healthy_database_and_broker(services, name):
    depends = conditions(services, name)
    assert depends.get("postgres") == "service_healthy"
    assert depends.get("redis") == "service_healthy"


def test_prefect_worker_waits_for_a_healthy_prefect_server(services):
    assert conditions(services, "prefect-worker").get("prefect-server") == "service_healthy"


@pytest.mark.parametrize("name", sorted(CELERY_SERVICES))
def test_celery_waits_for_healthy_slurm_and_prefect_server(services, name):
    depends = conditions(services, name)
    assert depends.get("slurm") == "service_healthy"
    assert depends.get("prefect-server") == "service_healthy"


def test_flower_and_prefect_server_wait_for_their_backends(services):
    assert conditions(services, "flower").get("redis") == "service_healthy"
    assert conditions(services, "prefect-server").get("postgres") == "service_healthy"


def test_no_service_waits_for_one_without_a_healthcheck_or_for_itself(services):
    for name in services:
        for dependency, condition in conditions(services, name).items():
            assert dependency != name
            assert dependency in services
            assert condition in {"service_healthy", "service_started"}


def command_text(service: dict) -> str:
    command = service.get("command") or []
    return command if isinstance(command, str) else " ".join(command)


def test_commands(services):
    assert "prefect server start --host 0.0.0.0 --port 4200" in command_text(services["prefect-server"])
    assert command_text(services["prefect-worker"]) == "python -m flows.serve"
    assert command_text(services["celery-worker"]) == "celery -A workers worker -l INFO"
    assert command_text(services["celery-tick-worker"]) == "celery -A workers worker -l INFO --concurrency 1"
    assert (
        command_text(services["celery-beat"]) == "celery -A workers beat -l INFO --schedule /var/lib/emg/beat/schedule"
    )
    assert command_text(services["flower"]).startswith("celery -A workers flower --port=5555")
    web = command_text(services["web"])
    assert "python manage.py migrate --noinput &&" in web
    assert "exec gunicorn emg.wsgi:application" in web and "--bind 0.0.0.0:8000" in web
    assert "--appendonly yes" in command_text(services["redis"])


def test_dispatch_and_the_reconcile_tick_have_a_worker_each(services):
    """A dispatch backlog cannot delay ticks: each worker consumes the queue of its one role."""
    assert services["celery-worker"]["environment"]["EMG_WORKER_ROLES"] == "dispatch"
    assert services["celery-tick-worker"]["environment"]["EMG_WORKER_ROLES"] == "reconcile"
    assert "EMG_WORKER_ROLES" not in services["celery-beat"]["environment"]


def test_web_healthcheck_uses_python_not_curl(services):
    test = " ".join(services["web"]["healthcheck"]["test"])
    assert "python" in test and "urllib" in test and "http://localhost:8000/health?check=database&check=redis" in test


def test_flower_gets_basic_auth_from_the_environment(services):
    flower = services["flower"]
    env = flower.get("environment") or {}
    assert env.get("FLOWER_BASIC_AUTH") == FLOWER_AUTH or f"--basic_auth={FLOWER_AUTH}" in command_text(flower)


def test_app_environment(services):
    for name in APP_SERVICES:
        env = services[name]["environment"]
        assert env["DATABASE_URL"] == f"postgres://postgres:{PG_PASSWORD}@postgres:5432/emg"
        assert env["REDIS_URL"] == f"redis://:{REDIS_PASSWORD}@redis:6379/0"
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["DJANGO_SECRET_KEY"] == DJANGO_SECRET
        assert env["DJANGO_DEBUG"] == "0"
        assert "localhost" in env["DJANGO_ALLOWED_HOSTS"].split(",")  # the web healthcheck needs it
        assert env["EMG_CLUSTER_BACKEND"] == "slurm"
        assert env["EMG_WORK_DIR"] == "/var/lib/emg/work"
        assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == "/var/lib/emg/prefect-results"
    assert services["prefect-worker"]["environment"]["PREFECT_RUNNER_POLL_FREQUENCY"] == "1"
    server_env = services["prefect-server"]["environment"]
    assert server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == (
        f"postgresql+asyncpg://postgres:{PG_PASSWORD}@postgres:5432/prefect"
    )
    assert server_env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert server_env["DO_NOT_TRACK"] == "1"


def mounts(service: dict) -> dict[str, str]:
    """target -> source, from the short ("src:dst[:mode]") or the long volume syntax."""
    found = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source"), volume["target"]
        found[target] = source
    return found


def test_shared_volumes(services):
    work = "/var/lib/emg/work"
    # The slurm node runs jobs in the work directory the flows and the reconciler prepare.
    work_volumes = {mounts(services[name]).get(work) for name in ("slurm", "prefect-worker", *CELERY_SERVICES)}
    assert len(work_volumes) == 1 and None not in work_volumes, work_volumes
    results = "/var/lib/emg/prefect-results"
    result_volumes = {mounts(services[name]).get(results) for name in ("prefect-worker", *CELERY_SERVICES)}
    assert len(result_volumes) == 1 and None not in result_volumes, result_volumes
    # Results outlive a container: one named volume where the data-move job writes them and where
    # the app services read them, at the path the app environment names.
    assert services["web"]["environment"]["EMG_RESULTS_DIR"] == "/var/lib/emg/results"
    results_volumes = {
        mounts(services[name]).get("/var/lib/emg/results")
        for name in ("slurm", "web", "prefect-worker", *CELERY_SERVICES)
    }
    assert len(results_volumes) == 1 and None not in results_volumes, results_volumes
    assert mounts(services["celery-beat"]).get("/var/lib/emg/beat")
    # Munge key and slurm.conf, written by the slurm service, read by the Celery containers.
    slurm = mounts(services["slurm"])
    for name in CELERY_SERVICES:
        celery = mounts(services[name])
        assert celery["/var/lib/emg/munge"] == slurm["/var/lib/emg/munge"]
        assert celery["/etc/slurm"] == slurm["/var/lib/emg/slurm-conf"]
    assert any(target.startswith("/docker-entrypoint-initdb.d") for target in mounts(services["postgres"]))
    assert mounts(services["redis"]).get("/data")


def strings(node, path=()):
    """Every string in the resolved configuration, with its path."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from strings(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from strings(value, (*path, str(index)))
    elif isinstance(node, str):
        yield path, node


def test_secrets_appear_only_where_they_belong(config):
    allowed = {
        PG_PASSWORD: {
            ("services", "postgres", "environment", "POSTGRES_PASSWORD"),
            ("services", "prefect-server", "environment", "PREFECT_SERVER_DATABASE_CONNECTION_URL"),
        }
        | {("services", name, "environment", "DATABASE_URL") for name in APP_SERVICES},
        DJANGO_SECRET: {("services", name, "environment", "DJANGO_SECRET_KEY") for name in APP_SERVICES},
        FLOWER_AUTH: {("services", "flower", "environment", "FLOWER_BASIC_AUTH")},
        # Redis's own, and the broker URL of every process that talks to it.
        REDIS_PASSWORD: {("services", "redis", "environment", "REDIS_PASSWORD")}
        | {("services", name, "environment", "REDIS_URL") for name in APP_SERVICES | {"flower"}},
        PREFECT_AUTH: {("services", "prefect-server", "environment", "PREFECT_SERVER_API_AUTH_STRING")}
        | {("services", name, "environment", "PREFECT_API_AUTH_STRING") for name in APP_SERVICES},
    }
    seen = {secret: set() for secret in allowed}
    for path, value in strings(config):
        for secret, places in allowed.items():
            if secret in value:
                assert path in places, f"{'.'.join(path)} carries a secret it should not"
                seen[secret].add(path)
    assert seen == allowed


SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH|_KEY$", re.IGNORECASE)
URL_CREDENTIALS = re.compile(r"://[^/:@\s]+:([^@\s]+)@")


# Optional secrets: unset, the feature they guard is off (EMG_MONITORING_TOKEN: /metrics for staff only).
OPTIONAL_SECRETS = {"EMG_MONITORING_TOKEN"}


def test_no_hard_coded_secrets(services):
    dummies = set(REQUIRED_ENV.values())
    for name, service in services.items():
        env = service.get("environment") or {}
        for key, value in env.items():
            value = "" if value is None else str(value)
            if key in OPTIONAL_SECRETS:
                assert value == "", f"{name}: {key} has a value of its own, not the environment's"
            elif SECRET_NAME.search(key) and not key.endswith("_FILE"):
                assert value in dummies, f"{name}: {key} is not taken from a variable"
            for password in URL_CREDENTIALS.findall(value):
                assert password in (PG_PASSWORD, REDIS_PASSWORD), f"{name}: {key} has a hard-coded password"


def test_secrets_in_the_file_are_only_variable_references():
    text = COMPOSE_FILE.read_text()
    for name in REQUIRED_ENV:
        # Every mention outside comments is a ${NAME...} reference, a $$NAME the container's shell
        # expands, or the variable's own key.
        for line in text.splitlines():
            code = line.split("#", 1)[0]
            if name in code:
                stripped = re.sub(r"\$\{" + name + r"(:?[?-][^}]*)?\}|\$\$" + name + r"\b", "", code)
                assert name not in stripped or re.match(rf"\s*{name}:\s*$", stripped), line
    for match in URL_CREDENTIALS.finditer(text):
        assert match.group(1).startswith("${"), match.group(0)


def test_the_slurm_node_where_pipeline_code_runs_reaches_neither_the_databases_nor_redis_nor_prefect(services):
    networks = {name: set(service.get("networks") or {"default"}) for name, service in services.items()}
    for guarded in ("postgres", "redis", "prefect-server"):
        assert networks["slurm"].isdisjoint(networks[guarded]), f"slurm shares a network with {guarded}"
    # ...while the processes that submit to Slurm, and web's health check, still reach it.
    for caller in ("celery-tick-worker", "web"):
        assert networks["slurm"] & networks[caller], f"{caller} cannot reach the slurm node"


def test_services_and_their_slurm_jobs_run_as_the_same_unprivileged_user_in_both_images():
    """Jobs run as whoever submitted them: the app image drops root before any service starts, and
    the slurm node knows the same user by the same uid."""
    docker = ROOT / "docker"
    user = "useradd --system --uid 10001 --user-group"
    assert user in (docker / "app.Dockerfile").read_text()
    assert user in (docker / "slurm.Dockerfile").read_text()
    entrypoint = (docker / "app-entrypoint.sh").read_text().split("\n")
    commands = [line.strip() for line in entrypoint if line.strip().startswith("exec ")]
    assert commands[0] == 'exec setpriv --reuid=emg --regid=emg --init-groups "$@"', commands
