"""What operators see and do, against the live stack: commands, a planted secret, and screenshots."""

import base64
import os
import secrets
import subprocess
from pathlib import Path
from unittest import mock

import psycopg
import pytest
from django.conf import settings
from prometheus_client.parser import text_string_to_metric_families
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
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]


def completed_request(stack, accession: str = "PRJEB40001") -> AnalysisRequest:
    study, _ = Study.objects.get_or_create(accession=accession)
    request = AnalysisRequest.objects.create(study=study)
    request = final_request(request, stack)
    assert request.status == AnalysisRequest.Status.COMPLETED, request.status_reason
    return request


def test_commands_show_requeue_and_reconcile_a_live_request(stack):
    study = Study.objects.create(accession="PRJEB40001")
    with cluster_blocked():
        with mock.patch("emg.outbox.publish_after_commit"):  # as if Redis had lost the event
            request = AnalysisRequest.objects.create(study=study)
        event = OutboxEvent.objects.of(request).get()

        requeued = run("requeue_events")
        assert f"[1/1] event {event.id} analysis-request {request.id}:generation:1: published" in requeued.splitlines()

        wait_until(
            lambda: AnalysisRequest.objects.get(id=request.id).flow_run_id,
            timeout=60,
            message="the requeued event made a flow run",
        )
        request.refresh_from_db()
        job = suspended_on_pending_assembly(request)
        requests_part, jobs_part, _ = sections(run("emg_status"))
        assert f"{request.flow_run_id}" in requests_part
        assert any(line.startswith(f"{request.id} ") and " WAITING " in line for line in requests_part.splitlines())
        assert any(
            line.startswith(f"{job.id} ") and f" {job.slurm_job_id} " in line and f"#{request.id}" in line
            for line in jobs_part.splitlines()
        )

        tick = wait_until(lambda: run("reconcile", "--once"), timeout=30, message="a tick by hand ran")
        assert tick.splitlines()[0].startswith("checked ") and "released waits:" in tick

    request = final_request(request, stack)
    assert request.status == AnalysisRequest.Status.COMPLETED, request.status_reason
    # The flow marks the request COMPLETED as its last step; Prefect's state follows a moment later.
    wait_until(
        lambda: state_names(request.flow_run_id)[-1] == "Completed", timeout=30, message="the flow run completed"
    )
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
            for row in connection.execute(
                sql.SQL("SELECT row_to_json(t)::text FROM {} t").format(sql.Identifier(table))
            )
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
    # On the slurmrestd backend (EMG_TEST_CLUSTER_BACKEND=slurmrestd) its JWT is a secret as well.
    token_file = stack.env.get("EMG_SLURMRESTD_TOKEN_FILE")
    planted = [PLANTED] + ([Path(token_file).read_text().strip()] if token_file else [])
    scripts = "\n".join(path.read_text() for path in Path(job.spec["work_dir"]).glob(".emg/*.sbatch"))
    assert scripts
    for secret in planted:
        for text in (ours, prefects, logs, scripts):
            assert secret not in text and secret.encode().hex() not in text


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
        wait_until(
            lambda: worker_name in browser.page_source,
            timeout=30,
            interval=0.5,
            message="Flower lists the stack's Celery worker",
        )
        assert screenshot(browser, "flower-dashboard").stat().st_size > 10_000
    finally:
        flower.stop()


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm's accounting's own word on each job's state."""
    output = subprocess.run(
        [
            "sacct",
            "--parsable2",
            "--noheader",
            "-X",
            "-S",
            "now-1days",
            "-o",
            "JobIDRaw,State",
            "-j",
            ",".join(job_ids),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return dict(line.split("|", 1) for line in output.splitlines() if "|" in line)


def test_metrics_after_a_real_run_agree_with_the_database_and_with_slurms_accounting(stack, client, settings):
    request = completed_request(stack, accession="PRJEB40002")
    jobs = jobs_of(request)
    token = secrets.token_urlsafe(24)
    settings.EMG_MONITORING_TOKEN = token
    # The beat ticks every second: let one finish after the request ended, and record the jobs' usage.
    wait_until(
        lambda: all(job.usage for job in ClusterJob.objects.filter(id__in=[j.id for j in jobs.values()])),
        timeout=120,
        interval=1,
        message="the reconciler recorded the request's jobs' usage",
    )

    response = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }

    def total(name: str, **labels) -> float:
        return sum(
            value
            for (sample, sample_labels), value in samples.items()
            if sample == name and set(labels.items()) <= set(sample_labels)
        )

    assert total("emg_requests", status="COMPLETED") == AnalysisRequest.objects.filter(status="COMPLETED").count() >= 1
    completed = list(ClusterJob.objects.filter(state="COMPLETED").values_list("slurm_job_id", flat=True))
    accounted = sacct_states(completed)
    assert total("emg_cluster_jobs", state="COMPLETED") == len(completed) >= len(jobs)
    assert [accounted.get(job_id) for job_id in completed] == ["COMPLETED"] * len(completed)
    assert total("emg_cluster_jobs") == ClusterJob.objects.count()
    assert total("emg_reconcile_ticks_total") >= 1 and total("emg_reconcile_last_tick_age_seconds") < 30
    assert total("emg_slurm_calls_total", command="sbatch") >= len(jobs)
    assert total("emg_flow_resumes_total") >= 1  # the request's flow waited for its jobs, suspended
    assert total("emg_outbox_dispatch_latency_seconds_count") >= 1 and total("emg_outbox_backlog") == 0


def test_screenshots_of_a_requests_timeline_its_jobs_trace_and_the_efficiency_report(
    stack, live_server, browser, django_user_model
):
    request = completed_request(stack, accession="PRJEB40001")
    job: ClusterJob = jobs_of(request)["assembly"]
    wait_until(
        lambda: ClusterJob.objects.get(id=job.id).usage,
        timeout=120,
        interval=1,
        message="the reconciler recorded the assembly job's usage",
    )
    password = secrets.token_urlsafe(12)
    django_user_model.objects.create_superuser("operator2", password=password)
    browser.get(f"{live_server.url}/admin/login/?next=/admin/emg/analysisrequest/{request.id}/change/")
    browser.find_element(By.ID, "id_username").send_keys("operator2")
    browser.find_element(By.ID, "id_password").send_keys(password)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait_until(lambda: "emg-timeline" in browser.page_source, timeout=20, message="the request page is shown")
    # The job's live time is drawn: running, or pending where it ran between two ticks (on a
    # loaded machine a seconds-long job can, and its history then never says RUNNING).
    assert browser.find_elements(
        By.CSS_SELECTOR, "svg.emg-timeline rect.phase-running, svg.emg-timeline rect.phase-pending"
    )
    assert screenshot(browser, "admin-request-timeline").stat().st_size > 20_000

    browser.get(f"{live_server.url}/admin/emg/clusterjob/{job.id}/change/?trace_sort=name")
    wait_until(lambda: "Efficiency (from sacct)" in browser.page_source, timeout=20, message="the job page")
    assert "peak" in browser.page_source and 'id="trace"' in browser.page_source
    assert screenshot(browser, "admin-job-trace-and-efficiency").stat().st_size > 20_000

    browser.get(f"{live_server.url}/admin/emg/clusterjob/efficiency/")
    wait_until(lambda: "Efficiency per pipeline step" in browser.page_source, timeout=20, message="the summary")
    assert "<td>assembly</td>" in browser.page_source
    assert screenshot(browser, "admin-efficiency-summary").stat().st_size > 10_000
