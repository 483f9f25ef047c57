"""The Django admin, driven through the test client on real PostgreSQL rows."""

import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from emg import tended_runs
from emg.models import (
    AnalysisRequest,
    ClusterJob,
    ClusterJobState,
    JobWait,
    OutboxEvent,
    ReconcileTick,
    Study,
    StudyQC,
    StudyReport,
    TendedRun,
)
from slurm_adapter import JobSpec

pytestmark = pytest.mark.django_db

ROOT_ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "admin"


def make_job(
    tmp_path, name: str = "emg-analysis-PRJEB1", state: str = "FAILED", slurm_job_id: str = "4242", **fields
) -> ClusterJob:
    spec = JobSpec(
        name=name,
        command=("bash", "pipeline.sh", "--study", "PRJEB1"),
        work_dir=str(tmp_path),
        time_limit_minutes=90,
        memory_mb=2048,
        cpus=4,
        environment={"NXF_OPTS": "-Xms1g"},
    )
    job = ClusterJob.objects.declare(
        name=name,
        fingerprint=uuid.uuid4().hex,
        spec=spec.to_dict(),
        input_hashes={"reads_1.fastq.gz": "sha256:abc123"},
        policy={"max_attempts": 3},
    )
    ClusterJob.objects.filter(id=job.id).update(state=state, slurm_job_id=slurm_job_id, **fields)
    job.refresh_from_db()
    return job


def make_request(accession: str = "PRJEB11111", **fields) -> AnalysisRequest:
    study, _ = Study.objects.get_or_create(accession=accession)
    request = AnalysisRequest.objects.create(study=study)
    AnalysisRequest.objects.filter(id=request.id).update(**fields)
    request.refresh_from_db()
    return request


def wait_for(request: AnalysisRequest, job: ClusterJob, step: str = "analysis") -> JobWait:
    return JobWait.objects.create(flow_run_id=request.flow_run_id or uuid.uuid4(), step=step, job=job, request=request)


@pytest.fixture
def rows(tmp_path):
    log = tmp_path / "slurm-4242.out"
    log.write_text("".join(f"pipeline line {n}\n" for n in range(1, 101)) + "\x1b[31mERROR: out of memory\x1b[0m\n")
    now = timezone.now().isoformat()
    job = make_job(
        tmp_path,
        exit_code=137,
        signal=9,
        attempts=1,
        log_path=str(log),
        raw_state="OUT_OF_MEMORY",
        trace=[
            {"name": "READ_QC (sample1)", "status": "COMPLETED", "exit": 0},
            {"name": "ASSEMBLY (sample1)", "status": "FAILED", "exit": 137},
        ],
        history=[
            {"state": "SUBMITTED", "detail": "sbatch -> 4242", "at": now},
            {"state": "FAILED", "detail": "OUT_OF_MEMORY exit 0:9", "at": now},
        ],
    )
    request = make_request(
        status=AnalysisRequest.Status.FAILED,
        current_step="analysis",
        status_reason="Slurm job 4242 ended OUT_OF_MEMORY",
        flow_run_id=uuid.uuid4(),
    )
    wait = wait_for(request, job)
    tick = ReconcileTick.objects.create(started_at=timezone.now(), worker="host:1", report={"checked": 1})
    tended = TendedRun.objects.create(flow_run_id=uuid.uuid4(), started_by="trigger study-created-qc (run key 1)")
    tended_runs.count_rerun(tended, "flow run crashed")
    return {
        "study": request.study,
        "request": request,
        "job": job,
        "wait": wait,
        "event": OutboxEvent.objects.of(request).get(),
        "tick": tick,
        "tended": tended,
    }


def admin_urls(rows) -> list[str]:
    urls = []
    for obj in rows.values():
        meta = obj._meta
        urls.append(reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist"))
        urls.append(reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[obj.pk]))
    return urls + [reverse("admin:emg_study_add"), reverse("admin:emg_analysisrequest_add")]


def test_every_admin_page_renders_for_staff(admin_client, rows):
    for url in admin_urls(rows):
        assert admin_client.get(url).status_code == 200, url


def test_every_admin_page_redirects_an_anonymous_visitor_to_login(client, rows):
    for url in admin_urls(rows):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("admin:login")), url


def test_job_page_shows_history_log_tail_script_resources_and_input_hashes(admin_client, rows):
    job = rows["job"]
    page = admin_client.get(reverse("admin:emg_clusterjob_change", args=[job.id])).content.decode()

    assert "<td>OUT_OF_MEMORY exit 0:9</td>" in page and "<td>sbatch -&gt; 4242</td>" in page
    assert "ERROR: out of memory" in page and "\x1b" not in page
    assert "pipeline line 100" in page and "pipeline line 50\n" not in page  # the tail only
    assert "bash pipeline.sh --study PRJEB1" in page
    assert "#!/bin/bash" in page and "export NXF_OPTS=-Xms1g" in page
    assert "90 min" in page and "2048 MB" in page
    assert "<td>reads_1.fastq.gz</td><td>sha256:abc123</td>" in page
    # The trace's task rows, whatever column order PostgreSQL's jsonb keeps.
    assert all(f">{column}</a></th>" in page for column in ("name", "status", "exit"))
    [row] = re.findall(r"<tr>(?:<td>[^<]*</td>)*<td>ASSEMBLY \(sample1\)</td>.*?</tr>", page)
    assert "<td>FAILED</td>" in row and "<td>137</td>" in row
    assert "137" in page and job.tag in page
    assert reverse("admin:emg_analysisrequest_change", args=[rows["request"].id]) in page


def test_a_waits_history_is_shown_on_its_page_and_in_its_requests_waits(admin_client, tmp_path):
    from emg import waits

    request = make_request(accession="PRJEB11112", flow_run_id=uuid.uuid4())
    job = make_job(tmp_path, name="emg-waited-for", state="RUNNING")
    wait = waits.attach(request.flow_run_id, "assembly", job.id, request.id)
    assert wait is not None
    assert waits.open_round(waits.rounds_read(request.flow_run_id, [job.id])) == 1
    assert waits.release([wait.id], "tick", "its flow run was resumed") == 1

    for url in (
        reverse("admin:emg_jobwait_change", args=[wait.id]),
        reverse("admin:emg_analysisrequest_change", args=[request.id]),
    ):
        page = admin_client.get(url).content.decode()
        rows = re.findall(r"<tr><td>[^<]*</td><td>(opened|reopened|released)</td><td>([^<]*)</td></tr>", page)
        assert rows == [
            ("opened", f"waits at assembly for job #{job.id}"),
            ("reopened", "round 1"),
            ("released", "by the tick: its flow run was resumed"),
        ], url


def test_request_pages_link_to_the_prefect_flow_run_and_the_jobs(admin_client, rows, settings):
    settings.PREFECT_UI_URL = "http://prefect.example:4200"
    request = rows["request"]
    listing = admin_client.get(reverse("admin:emg_analysisrequest_changelist")).content.decode()
    detail = admin_client.get(reverse("admin:emg_analysisrequest_change", args=[request.id])).content.decode()

    flow_run_url = f"http://prefect.example:4200/runs/flow-run/{request.flow_run_id}"
    assert flow_run_url in listing and flow_run_url in detail
    assert "Slurm job 4242 ended OUT_OF_MEMORY" in listing
    jobs_url = f"{reverse('admin:emg_clusterjob_changelist')}?waits__request__id__exact={request.id}"
    assert jobs_url in listing
    assert reverse("admin:emg_clusterjob_change", args=[rows["job"].id]) in detail

    jobs = admin_client.get(jobs_url)
    assert jobs.status_code == 200 and list(jobs.context["cl"].result_list) == [rows["job"]]


def test_lists_filter_by_state_and_find_rows_by_slurm_id_or_accession(admin_client, rows, tmp_path):
    other = make_job(tmp_path, name="other", state="COMPLETED", slurm_job_id="777")
    url = reverse("admin:emg_clusterjob_changelist")

    def listed(**query):
        return list(admin_client.get(url, query).context["cl"].result_list)

    assert listed(state__exact="COMPLETED") == [other]
    assert listed(q="777") == [other]
    assert listed(q="PRJEB11111") == [rows["job"]]
    for query in ("PRJEB11111", "4242"):
        found = admin_client.get(reverse("admin:emg_analysisrequest_changelist"), {"q": query}).context["cl"]
        assert list(found.result_list) == [rows["request"]], query


@pytest.mark.parametrize("model", ["analysisrequest", "clusterjob", "jobwait", "outboxevent", "tendedrun"])
def test_list_pages_make_the_same_number_of_queries_for_many_rows_as_for_one(admin_client, tmp_path, model):
    def queries_for_list() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(reverse(f"admin:emg_{model}_changelist")).status_code == 200
        return len(captured)

    def add_row(n: int) -> None:
        request = make_request(accession=f"PRJEB2000{n}", flow_run_id=uuid.uuid4())
        wait_for(request, make_job(tmp_path, name=f"job-{n}", slurm_job_id=str(n)))
        TendedRun.objects.create(flow_run_id=uuid.uuid4(), started_by=f"child c{n} of flow run {request.flow_run_id}")

    add_row(1)
    one = queries_for_list()
    for n in range(2, 7):
        add_row(n)
    assert queries_for_list() == one


def post_action(admin_client, model: str, action: str, objects) -> list[str]:
    response = admin_client.post(
        reverse(f"admin:emg_{model}_changelist"),
        {"action": action, "_selected_action": [obj.pk for obj in objects]},
        follow=True,
    )
    assert response.status_code == 200
    return [str(message) for message in response.context["messages"]]


def test_cancel_action_asks_the_reconciler_to_cancel_unfinished_requests_only(admin_client, rows):
    waiting = make_request(accession="PRJEB33333", status=AnalysisRequest.Status.WAITING)
    failed = rows["request"]

    notes = post_action(admin_client, "analysisrequest", "cancel", [waiting, failed])

    waiting.refresh_from_db()
    failed.refresh_from_db()
    assert waiting.cancel_requested_at is not None
    assert failed.cancel_requested_at is None
    assert any(f"#{waiting.id}" in note and "requested" in note for note in notes)
    assert any(f"#{failed.id} has already ended" in note for note in notes)


def test_rerun_action_starts_a_new_generation_of_a_failed_request_with_a_new_event(admin_client, rows):
    failed = rows["request"]
    running = make_request(accession="PRJEB44444", status=AnalysisRequest.Status.RUNNING)

    notes = post_action(admin_client, "analysisrequest", "rerun", [failed, running])

    failed.refresh_from_db()
    running.refresh_from_db()
    assert (failed.generation, failed.status, failed.flow_run_id) == (2, AnalysisRequest.Status.PENDING, None)
    assert sorted(OutboxEvent.objects.of(failed).values_list("parameters__generation", flat=True)) == [1, 2]
    assert running.generation == 1
    assert any("still RUNNING" in note for note in notes)


def test_resubmit_action_declares_an_ended_job_again_and_refuses_a_live_one(admin_client, rows, tmp_path):
    failed = rows["job"]
    running = make_job(tmp_path, name="running", state=ClusterJobState.RUNNING, slurm_job_id="99")

    notes = post_action(admin_client, "clusterjob", "resubmit", [failed, running])

    twin = ClusterJob.objects.exclude(id__in=[failed.id, running.id]).get()
    assert (twin.state, twin.fingerprint, twin.spec) == (ClusterJobState.DECLARED, failed.fingerprint, failed.spec)
    assert ClusterJob.objects.get(id=failed.id).state == "FAILED"  # its history stays
    assert any(f"#{failed.id} as #{twin.id}" in note for note in notes)
    assert any("still RUNNING" in note for note in notes)


# --- who may act --------------------------------------------------------------------------------


def staff_user(username: str, *codenames: str) -> User:
    user = User.objects.create_user(username, password="pw-for-tests", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="emg", codename__in=codenames))
    return user


VIEW_ONLY = ("view_analysisrequest", "view_clusterjob")
ACTIONS = [
    ("analysisrequest", "cancel"),
    ("analysisrequest", "rerun"),
    ("clusterjob", "resubmit"),
    ("analysisrequest", "delete_selected"),
    ("clusterjob", "delete_selected"),
]


def post_raw_action(client, model: str, action: str, objects):
    return client.post(
        reverse(f"admin:emg_{model}_changelist"), {"action": action, "_selected_action": [obj.pk for obj in objects]}
    )


@pytest.mark.parametrize(("model", "action"), ACTIONS)
def test_a_view_only_staff_user_is_refused_every_action_and_nothing_changes(client, rows, tmp_path, model, action):
    waiting = make_request(accession="PRJEB33334", status=AnalysisRequest.Status.WAITING)
    client.force_login(staff_user("viewer", *VIEW_ONLY))
    target = {"analysisrequest": [waiting, rows["request"]], "clusterjob": [rows["job"]]}[model]
    page = client.get(reverse(f"admin:emg_{model}_changelist"))
    assert page.status_code == 200 and f'value="{action}"' not in page.content.decode()

    assert post_raw_action(client, model, action, target).status_code == 403

    waiting.refresh_from_db()
    rows["request"].refresh_from_db()
    assert waiting.cancel_requested_at is None and rows["request"].generation == 1
    assert ClusterJob.objects.count() == 1 and AnalysisRequest.objects.count() == 2


def test_the_change_permission_alone_does_not_allow_cancelling_or_rerunning(client, rows):
    waiting = make_request(accession="PRJEB33335", status=AnalysisRequest.Status.WAITING)
    client.force_login(staff_user("editor", *VIEW_ONLY, "change_analysisrequest", "change_clusterjob"))

    assert post_raw_action(client, "analysisrequest", "cancel", [waiting]).status_code == 403
    assert post_raw_action(client, "analysisrequest", "rerun", [rows["request"]]).status_code == 403
    assert post_raw_action(client, "clusterjob", "resubmit", [rows["job"]]).status_code == 403
    waiting.refresh_from_db()
    assert waiting.cancel_requested_at is None


def test_each_action_runs_for_a_staff_user_granted_its_permission(client, rows):
    waiting = make_request(accession="PRJEB33336", status=AnalysisRequest.Status.WAITING)
    client.force_login(
        staff_user("operator", *VIEW_ONLY, "cancel_analysisrequest", "rerun_analysisrequest", "resubmit_clusterjob")
    )
    listing = client.get(reverse("admin:emg_analysisrequest_changelist")).content.decode()
    assert 'value="cancel"' in listing and 'value="rerun"' in listing

    notes = post_action(client, "analysisrequest", "cancel", [waiting])
    assert any("Cancellation requested" in note for note in notes)
    post_action(client, "analysisrequest", "rerun", [rows["request"]])
    post_action(client, "clusterjob", "resubmit", [rows["job"]])

    waiting.refresh_from_db()
    rows["request"].refresh_from_db()
    assert waiting.cancel_requested_at is not None and rows["request"].generation == 2
    assert ClusterJob.objects.filter(fingerprint=rows["job"].fingerprint).count() == 2


# --- what may be edited --------------------------------------------------------------------------


def form_fields(admin_client, request: AnalysisRequest) -> set[str]:
    response = admin_client.get(reverse("admin:emg_analysisrequest_change", args=[request.id]))
    return set(response.context["adminform"].form.fields)


@pytest.mark.parametrize("status", ["PENDING", "RUNNING", "WAITING"])
def test_an_unfinished_requests_study_and_options_are_read_only(admin_client, status):
    request = make_request(accession="PRJEB66601", status=status, pipeline_options={"k": 31})
    other = Study.objects.create(accession="PRJEB66602")
    assert form_fields(admin_client, request) == set()
    page = admin_client.get(reverse("admin:emg_analysisrequest_change", args=[request.id])).content.decode()
    assert 'name="pipeline_options"' not in page and 'name="study"' not in page

    response = admin_client.post(
        reverse("admin:emg_analysisrequest_change", args=[request.id]),
        {"study": other.id, "pipeline_options": '{"k": 21}', "waits-TOTAL_FORMS": 0, "waits-INITIAL_FORMS": 0},
    )
    assert response.status_code == 302  # saved: the posted study and options were not form fields

    request.refresh_from_db()
    assert (request.study.accession, request.pipeline_options) == ("PRJEB66601", {"k": 31})


def test_an_ended_request_can_be_edited_and_a_save_writes_only_what_its_form_changed(admin_client):
    request = make_request(accession="PRJEB66603", status="FAILED", pipeline_options={"k": 31})
    other = Study.objects.create(accession="PRJEB66604")
    assert form_fields(admin_client, request) == {"study", "pipeline_options"}
    url = reverse("admin:emg_analysisrequest_change", args=[request.id])
    shown = {
        "initial-study": request.study.id,
        "initial-pipeline_options": '{"k": 31}',
        "waits-TOTAL_FORMS": 0,
        "waits-INITIAL_FORMS": 0,
    }
    # Two operators opened the form; the first changes the options, the second (shown the old
    # options) the study: the second save must not put the old options back.
    first = admin_client.post(url, {**shown, "study": request.study.id, "pipeline_options": '{"k": 21}'})
    second = admin_client.post(url, {**shown, "study": other.id, "pipeline_options": '{"k": 31}'})
    assert (first.status_code, second.status_code) == (302, 302)

    request.refresh_from_db()
    assert (request.study, request.pipeline_options) == (other, {"k": 21})


# --- a picture per request ---------------------------------------------------------------------


def test_a_request_page_draws_its_life_and_its_jobs_phases_with_the_retry_and_the_waiting_times(admin_client, tmp_path):
    start = timezone.now() - timezone.timedelta(days=7)

    def at(hours: float) -> str:
        return (start + timezone.timedelta(hours=hours)).isoformat()

    request = make_request(
        accession="PRJEB88801",
        status="COMPLETED",
        finished_at=start + timezone.timedelta(days=6),
        created_at=start,
        history=[
            {"state": "RUNNING", "detail": "fetching from ENA", "at": at(0.1)},
            {"state": "WAITING", "detail": "assembly", "at": at(0.2)},
            {"state": "RUNNING", "detail": "assembly", "at": at(6 * 24 - 1)},
            {"state": "COMPLETED", "detail": "results in /r <b>", "at": at(6 * 24)},
        ],
    )
    job = make_job(
        tmp_path,
        name="emg-assembly-PRJEB88801",
        state="COMPLETED",
        created_at=start,
        history=[
            {"state": "CLAIMED", "detail": "attempt 1", "at": at(0.2)},
            {"state": "SUBMITTED", "detail": "sbatch -> 1", "at": at(0.2)},
            {"state": "RUNNING", "detail": "RUNNING", "at": at(48.2)},  # queued 2 days
            {"state": "OUT_OF_MEMORY", "detail": "OUT_OF_MEMORY exit 0:9", "at": at(50)},
            {"state": "DECLARED", "detail": "out of memory: 2048 MB -> 4096 MB", "at": at(50)},
            {"state": "SUBMITTED", "detail": "sbatch -> 2", "at": at(50.1)},
            {"state": "RUNNING", "detail": "RUNNING", "at": at(51)},
            {"state": "COMPLETED", "detail": "COMPLETED exit 0:0", "at": at(6 * 24 - 1)},
        ],
    )
    wait_for(request, job, step="assembly")

    page = admin_client.get(reverse("admin:emg_analysisrequest_change", args=[request.id])).content.decode()

    [drawing] = re.findall(r'<svg xmlns="http://www.w3.org/2000/svg" class="emg-timeline".*?</svg>', page, re.S)
    assert f"request #{request.id} (gen 1)" in drawing and f"assembly: job #{job.id}" in drawing
    assert "<title>WAITING 5d 22h: assembly</title>" in drawing  # the request's wait for the cluster
    assert "<title>pending 2d: sbatch -&gt; 1</title>" in drawing  # the job queued two days
    assert "<title>running 1h 48m: RUNNING</title>" in drawing  # the attempt that ran out of memory
    assert "<title>retried: out of memory: 2048 MB -&gt; 4096 MB</title>" in drawing
    assert drawing.count('class="phase-pending"') == 2 and drawing.count('class="phase-running"') == 2
    assert "<b>" not in drawing and "results in /r &lt;b&gt;" in drawing
    screenshot(drawing, "timeline")


def screenshot(html: str, name: str) -> None:
    """The drawing as a page, and its picture taken by headless Chromium, kept with the test artifacts."""
    ROOT_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = ROOT_ARTIFACTS / f"{name}.html"
    page.write_text(f"<!doctype html><html><body>{html}</body></html>")
    picture = ROOT_ARTIFACTS / f"{name}.png"
    picture.unlink(missing_ok=True)
    subprocess.run(
        [
            shutil.which("chromium") or "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1000,400",
            f"--screenshot={picture}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert picture.stat().st_size > 1000


def test_a_request_with_no_history_yet_draws_its_pending_time(admin_client):
    request = make_request(accession="PRJEB88802")
    page = admin_client.get(reverse("admin:emg_analysisrequest_change", args=[request.id])).content.decode()
    assert 'class="emg-timeline"' in page and 'class="phase-PENDING"' in page


# --- efficiency -------------------------------------------------------------------------------

USAGE = {
    "elapsed_s": 7200,
    "cpu_s": 3600,
    "cpus": 4,
    "max_rss_mb": 1800,
    "requested_memory_mb": 2048,
    "time_limit_s": 6 * 3600,
}


def test_a_jobs_page_shows_what_it_used_of_what_it_asked_and_flags_the_under_used(admin_client, rows):
    job = rows["job"]
    ClusterJob.objects.filter(id=job.id).update(usage=USAGE)

    page = admin_client.get(reverse("admin:emg_clusterjob_change", args=[job.id])).content.decode()

    # 1 h of CPU from 4 CPUs over 2 h: 12%; 1800 of 2048 MB: 88%; 2 h of 6 h: 33%.
    assert "12%: 1h CPU time of 4 CPU(s) x 2h (under-used)" in page
    assert "88%: peak 1800 MB of 2048 MB requested" in page and "88%: peak 1800 MB of 2048 MB requested (" not in page
    assert "33%: 2h of a 6h limit (under-used)" in page


TRACE_TASKS = [
    {
        "task_id": "1",
        "name": "READ_QC (s1)",
        "status": "COMPLETED",
        "realtime_s": 90.0,
        "peak_rss_bytes": 300 * 1024 * 1024,
        "cpu_percent": 95.5,
    },
    {
        "task_id": "2",
        "name": "ASSEMBLY (s1)",
        "status": "COMPLETED",
        "realtime_s": 7200.0,
        "peak_rss_bytes": 1536 * 1024 * 1024,
        "cpu_percent": 380.0,
    },
    {
        "task_id": "3",
        "name": "ANNOTATE (s1)",
        "status": "ABORTED",
        "realtime_s": None,
        "peak_rss_bytes": None,
        "cpu_percent": None,
    },
]


def test_the_nextflow_trace_says_which_task_the_memory_request_must_cover_and_how_busy_the_cpus_were(
    admin_client, tmp_path
):
    # 4 CPUs and 2048 MB requested (make_job): ASSEMBLY peaked at 1536 MB (75%) and kept 3.8 of them busy (95%).
    job = make_job(tmp_path, state="COMPLETED", trace={"summary": {"tasks": 3}, "tasks": TRACE_TASKS})
    page = admin_client.get(reverse("admin:emg_clusterjob_change", args=[job.id])).content.decode()
    assert "75% of the request: ASSEMBLY (s1)" in page and "75% of the request: ASSEMBLY (s1) (under-used)" not in page
    assert "95% of 4 CPU(s): ASSEMBLY (s1)" in page

    small = [{**task, "peak_rss_bytes": 100 * 1024 * 1024, "cpu_percent": 50.0} for task in TRACE_TASKS[:2]]
    oversized = make_job(tmp_path, state="COMPLETED", slurm_job_id="4243", trace={"tasks": small})
    page = admin_client.get(reverse("admin:emg_clusterjob_change", args=[oversized.id])).content.decode()
    assert "5% of the request: READ_QC (s1) (under-used)" in page  # the larger of two equal peaks: the first
    assert "12% of 4 CPU(s): READ_QC (s1) (under-used)" in page


def test_a_request_page_reports_each_jobs_efficiency_and_the_summary_per_step(admin_client, rows, tmp_path):
    ClusterJob.objects.filter(id=rows["job"].id).update(usage=USAGE)
    second = make_job(
        tmp_path,
        name="emg-assembly-PRJEB1",
        state="COMPLETED",
        slurm_job_id="4343",
        usage={**USAGE, "cpu_s": 4 * 7000, "max_rss_mb": 1000},
    )
    wait_for(rows["request"], second, step="assembly")
    unmeasured = make_job(tmp_path, name="emg-datamove", state="COMPLETED", slurm_job_id="4444")
    wait_for(rows["request"], unmeasured, step="data move")

    page = admin_client.get(reverse("admin:emg_analysisrequest_change", args=[rows["request"].id])).content.decode()
    assert "<td>analysis</td>" in page and "<td>12%</td><td>88%</td><td>33%</td>" in page
    assert "<td>97%</td><td>49%</td><td>33%</td>" in page and "no usage recorded yet" in page
    summary_url = reverse("admin:emg_clusterjob_efficiency")
    assert summary_url in page

    summary = admin_client.get(summary_url)
    assert summary.status_code == 200
    text = summary.content.decode()
    assert "<td>analysis</td><td>1</td><td>1</td><td>12%</td><td>88%</td><td>1800 MB of 2048 MB</td>" in text
    assert "<td>assembly</td><td>1</td><td>1</td><td>97%</td><td>49%</td><td>1000 MB of 2048 MB</td>" in text
    assert "data move" not in text
    screenshot(text[text.index("<table>") : text.index("</table>") + 8], "efficiency-summary")


def test_the_efficiency_summary_is_for_staff_who_may_view_jobs(client, rows):
    url = reverse("admin:emg_clusterjob_efficiency")
    assert client.get(url).status_code == 302  # to the login page
    client.force_login(staff_user("nobody-in-particular"))
    assert client.get(url).status_code == 403
    client.force_login(staff_user("viewer-of-jobs", "view_clusterjob"))
    assert client.get(url).status_code == 200


def test_a_jobs_nextflow_trace_is_a_summary_and_a_task_table_sortable_by_any_column(admin_client, tmp_path):
    tasks = [
        {
            "task_id": "1",
            "name": "READ_QC (s1)",
            "status": "COMPLETED",
            "realtime_s": 90.0,
            "peak_rss_bytes": 300 * 1024 * 1024,
            "cpu_percent": 95.5,
        },
        {
            "task_id": "2",
            "name": "ASSEMBLY (s1)",
            "status": "FAILED",
            "realtime_s": 7200.0,
            "peak_rss_bytes": 3 * 1024**3,
            "cpu_percent": 380.0,
        },
        {
            "task_id": "3",
            "name": "ANNOTATE (s1)",
            "status": "ABORTED",
            "realtime_s": None,
            "peak_rss_bytes": None,
            "cpu_percent": None,
        },
    ]
    job = make_job(
        tmp_path,
        trace={
            "summary": {
                "tasks": 3,
                "by_status": {"COMPLETED": 1, "FAILED": 1},
                "max_peak_rss_bytes": 3 * 1024**3,
                "failed_tasks": ["ASSEMBLY (s1)"],
            },
            "tasks": tasks,
        },
    )
    url = reverse("admin:emg_clusterjob_change", args=[job.id])

    def names_in_order(**query) -> list[str]:
        page = admin_client.get(url, query).content.decode()
        table = page[page.index('<table id="trace"') :]
        table = table[: table.index("</table>")]
        return re.findall(r"<td>(\w+ \(s1\))</td>", table)

    page = admin_client.get(url).content.decode()
    [by_status] = re.findall(r"<td>by_status</td><td>([^<]*)</td>", page)
    assert sorted(by_status.split(", ")) == ["COMPLETED: 1", "FAILED: 1"]  # in jsonb's key order
    assert "<td>max_peak_rss_bytes</td><td>3072.0 MB</td>" in page and "{&#x27;" not in page  # no dict dump
    assert "<td>2h</td>" in page and "<td>380.0%</td>" in page
    assert names_in_order() == ["READ_QC (s1)", "ASSEMBLY (s1)", "ANNOTATE (s1)"]
    assert names_in_order(trace_sort="peak_rss_bytes", trace_order="desc") == [
        "ASSEMBLY (s1)",
        "READ_QC (s1)",
        "ANNOTATE (s1)",
    ]  # missing values last either way
    assert names_in_order(trace_sort="realtime_s") == ["READ_QC (s1)", "ASSEMBLY (s1)", "ANNOTATE (s1)"]
    assert names_in_order(trace_sort="name") == ["ANNOTATE (s1)", "ASSEMBLY (s1)", "READ_QC (s1)"]
    assert names_in_order(trace_sort="not-a-column") == ["READ_QC (s1)", "ASSEMBLY (s1)", "ANNOTATE (s1)"]
    sorted_page = admin_client.get(url, {"trace_sort": "name"}).content.decode()
    assert 'href="?trace_sort=name&amp;trace_order=desc#trace">name▲</a>' in sorted_page
    table = sorted_page[sorted_page.index('<table id="trace"') :]
    screenshot(table[: table.index("</table>") + 8], "trace-table")


def test_adding_a_study_report_asks_for_the_study_to_be_processed_and_its_qc_pages_render(admin_client, tmp_path):
    study = Study.objects.create(accession="PRJEB40012")

    response = admin_client.post(reverse("admin:emg_studyreport_add"), {"study": study.id})

    assert response.status_code == 302, response.content.decode()[:2000]
    report = StudyReport.objects.get(study=study)
    assert OutboxEvent.objects.of(report).get().trigger == "study-report"
    qc = StudyQC.objects.create(study=study, flow_run_id=uuid.uuid4(), run_accessions=["ERR4801201"])
    for url in (
        reverse("admin:emg_studyreport_change", args=[report.id]),
        reverse("admin:emg_studyqc_changelist"),
        reverse("admin:emg_studyqc_change", args=[qc.id]),
    ):
        assert admin_client.get(url).status_code == 200, url
    # What the flow writes cannot be written here.
    admin_client.post(reverse("admin:emg_studyreport_change", args=[report.id]), {"summary": '{"forged": 1}'})
    report.refresh_from_db()
    assert report.summary == {}
    assert admin_client.post(reverse("admin:emg_studyreport_add"), {"study": ""}).status_code == 200  # refused
    assert StudyReport.objects.count() == 1
