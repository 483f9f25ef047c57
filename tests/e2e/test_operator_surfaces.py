"""What operators see and do, against the live stack: commands, a planted secret, and screenshots."""

import base64
import os
import secrets
from pathlib import Path
from unittest import mock

import psycopg
import pytest
from django.conf import settings
from psycopg import sql
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from devstack.processes import ROOT, wait_until
from devstack.stack import start_flower
from emg.models import AnalysisRequest, ClusterJob, OutboxEvent, Study
from tests.conftest import PREFECT_TEST_DATABASE
from tests.e2e.requests import final_request, jobs_of, state_names, suspended_on_pending_assembly
from tests.slurm import cluster_blocked
from tests.test_commands import run, sections

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.django_db(transaction=True)]

# Planted when this module is collected, before any test runs and so before the session's stack
# copies os.environ for its processes: the flow runs that build job specs see it too.
PLANTED_NAME = "AWS_SECRET_ACCESS_KEY"
PLANTED = f"planted-{secrets.token_hex(16)}"
os.environ[PLANTED_NAME] = PLANTED

SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000"]


def completed_request(stack, accession: str = "PRJEB40001") -> AnalysisRequest:
    study, _ = Study.objects.get_or_create(accession=accession)
    request = AnalysisRequest.objects.create(study=study)
    request = final_request(request, stack)
    assert request.status == AnalysisRequest.Status.COMPLETED, request.status_reason
    return request


def test_commands_show_requeue_and_reconcile_a_live_request(stack):
    study = Study.objects.create(accession="PRJEB40001")
    with cluster_blocked():
        with mock.patch("emg.signals.publish_after_commit"):  # as if Redis had lost the event
            request = AnalysisRequest.objects.create(study=study)
        event = OutboxEvent.objects.get(request=request)

        requeued = run("requeue_events")
        assert f"[1/1] event {event.id} request #{request.id} generation 1: published" in requeued.splitlines()

        wait_until(lambda: AnalysisRequest.objects.get(id=request.id).flow_run_id, timeout=60,
                   message="the requeued event made a flow run")
        request.refresh_from_db()
        job = suspended_on_pending_assembly(request)
        requests_part, jobs_part, _ = sections(run("emg_status"))
        assert f"{request.flow_run_id}" in requests_part
        assert any(line.startswith(f"{request.id} ") and " WAITING " in line for line in requests_part.splitlines())
        assert any(line.startswith(f"{job.id} ") and f" {job.slurm_job_id} " in line and f"#{request.id}" in line
                   for line in jobs_part.splitlines())

        tick = wait_until(lambda: run("reconcile", "--once"), timeout=30, message="a tick by hand ran")
        assert tick.splitlines()[0].startswith("checked ") and "released waits:" in tick

    request = final_request(request, stack)
    assert request.status == AnalysisRequest.Status.COMPLETED, request.status_reason
    # The flow marks the request COMPLETED as its last step; Prefect's state follows a moment later.
    wait_until(lambda: state_names(request.flow_run_id)[-1] == "Completed", timeout=30,
               message="the flow run completed")
    requests_part, jobs_part, stuck_part = sections(run("emg_status"))
    [line] = [line for line in requests_part.splitlines() if line.startswith(f"{request.id} ")]
    assert " COMPLETED " in line and " Completed " in line  # ours, and Prefect's state of its flow run
    assert stuck_part.strip() == "nothing stuck"


def database_rows(name: str) -> str:
    """Every row of every table of a database, as JSON text."""
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}") as connection:
        tables = connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
        ).fetchall()
        assert tables, f"database {name} has no tables"
        return "\n".join(
            row[0]
            for (table,) in tables
            for row in connection.execute(sql.SQL("SELECT row_to_json(t)::text FROM {} t").format(sql.Identifier(table)))
        )


def test_planted_secret_reaches_neither_database_nor_logs(stack, service_logs):
    assert stack.env[PLANTED_NAME] == PLANTED, "the stack must have started with the planted secret"
    request = completed_request(stack)
    job = jobs_of(request)["assembly"]
    assert PLANTED_NAME not in job.spec["environment"]

    ours = database_rows(settings.DATABASES["default"]["NAME"])
    prefects = database_rows(PREFECT_TEST_DATABASE)
    logs = "\n".join(path.read_text(errors="replace") for path in sorted(service_logs.glob("*.log")))

    assert job.slurm_job_id in ours and str(request.flow_run_id) in prefects and logs  # the scans saw real data
    for text in (ours, prefects, logs):
        assert PLANTED not in text and PLANTED.encode().hex() not in text


@pytest.fixture
def browser(tmp_path):
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager never runs, so nothing is downloaded.
    driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()


def screenshot(driver, name: str) -> Path:
    """The whole page, not just the window."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(max(height, 800), 6000))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    assert driver.save_screenshot(str(path))
    return path


def test_screenshot_of_the_admin_job_page(stack, live_server, browser, django_user_model):
    request = completed_request(stack)
    job: ClusterJob = jobs_of(request)["assembly"]
    password = secrets.token_urlsafe(12)
    django_user_model.objects.create_superuser("operator", password=password)

    browser.get(f"{live_server.url}/admin/login/?next=/admin/emg/clusterjob/{job.id}/change/")
    browser.find_element(By.ID, "id_username").send_keys("operator")
    browser.find_element(By.ID, "id_password").send_keys(password)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait_until(lambda: "State history" in browser.page_source, timeout=20, message="the job page is shown")

    page = browser.page_source
    assert job.slurm_job_id in page and "COMPLETED" in page and "assembled " in page  # the log's last line
    assert screenshot(browser, "admin-cluster-job").stat().st_size > 20_000


def test_screenshot_of_flower_with_the_stack_worker(stack, browser, service_logs):
    password = secrets.token_urlsafe(12)
    flower, url = start_flower(stack.env, service_logs, f"operator:{password}")
    try:
        # Chromium asks for basic auth in a dialog; the header answers it on every request instead.
        token = base64.b64encode(f"operator:{password}".encode()).decode()
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
        browser.get(url)
        worker_name = f"e2e-{os.getpid()}@"
        wait_until(lambda: worker_name in browser.page_source, timeout=30, interval=0.5,
                   message="Flower lists the stack's Celery worker")
        assert screenshot(browser, "flower-dashboard").stat().st_size > 10_000
    finally:
        flower.stop()
