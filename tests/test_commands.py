"""The operators' management commands, run with call_command on real rows (and real Slurm for reconcile)."""

import io
import re
import subprocess
import uuid
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from devstack.processes import wait_until
from emg.models import AnalysisRequest, ClusterJob, ClusterJobState, JobWait, OutboxEvent, ReconcileTick, Study
from slurm_adapter import JobSpec
from tests.workers.ticking import held_tick_lock

pytestmark = pytest.mark.django_db


def run(command: str, *args) -> str:
    out = io.StringIO()
    call_command(command, *args, stdout=out, stderr=out)
    return out.getvalue()


def sections(output: str) -> list[str]:
    """The Requests, Cluster jobs and Stuck parts of emg_status's output, in that order."""
    return re.split(r"^(?:Requests|Cluster jobs|Stuck)\b.*$", output, flags=re.M)[1:]


def declare(tmp_path, name: str) -> ClusterJob:
    spec = JobSpec(name=name, command=("true",), work_dir=str(tmp_path), time_limit_minutes=1, memory_mb=100)
    return ClusterJob.objects.declare(
        name=name, fingerprint=uuid.uuid4().hex, spec=spec.to_dict(), input_hashes={}, policy={}
    )


def long_ago(seconds: float):
    return timezone.now() - timedelta(seconds=seconds)


@pytest.fixture
def reconciler_blocked():
    """Holds the reconcile lock, so no tick (beat's, if an e2e stack is up, or ours) can run."""
    with held_tick_lock(timeout=30):
        yield


def test_status_lists_requests_and_jobs_and_names_what_is_stuck(tmp_path, reconciler_blocked):
    ReconcileTick.objects.all().delete()
    study = Study.objects.create(accession="PRJEB55501")
    waiting = AnalysisRequest.objects.create(study=study)
    done = AnalysisRequest.objects.create(study=study)
    flow_run = uuid.uuid4()
    AnalysisRequest.objects.filter(id=waiting.id).update(
        status="WAITING", current_step="analysis", flow_run_id=flow_run, updated_at=long_ago(3600)
    )
    AnalysisRequest.objects.filter(id=done.id).update(
        status="COMPLETED", finished_at=timezone.now(), status_reason="Slurm job 11 completed"
    )
    OutboxEvent.objects.of(done).update(dispatched_at=timezone.now())
    OutboxEvent.objects.of(waiting).update(
        created_at=long_ago(600), publish_attempts=3, last_error="publish failed: broker down"
    )
    silent = declare(tmp_path, "silent-job")
    ClusterJob.objects.filter(id=silent.id).update(
        state=ClusterJobState.RUNNING, slurm_job_id="31337", state_checked_at=long_ago(3600)
    )
    ended = declare(tmp_path, "ended-job")
    ClusterJob.objects.filter(id=ended.id).update(state="FAILED", slurm_job_id="31338", exit_code=2)
    JobWait.objects.create(flow_run_id=flow_run, step="analysis", job=ended, request=waiting)

    requests_part, jobs_part, stuck_part = sections(run("emg_status"))
    assert re.search(rf"^{waiting.id} +PRJEB55501 +WAITING +analysis +1 +{flow_run} ", requests_part, re.M)
    assert re.search(rf"^{done.id} +PRJEB55501 +COMPLETED .*Slurm job 11 completed$", requests_part, re.M)
    assert re.search(rf"^{silent.id} +silent-job +31337 +RUNNING .* 1h +-$", jobs_part, re.M)
    assert re.search(rf"^{ended.id} +ended-job +31338 +FAILED +2 .* #{waiting.id}$", jobs_part, re.M)
    assert "the reconciler has not ticked yet" in stuck_part
    assert (
        f"(analysis-request {waiting.id}:generation:1) not dispatched after 10m, published 3 time(s): publish failed"
        in stuck_part
    )
    assert f"job #{silent.id} (Slurm 31337, RUNNING) not checked for 1h" in stuck_part
    assert f"request #{waiting.id} WAITING for 1h with no live job" in stuck_part
    assert f"request #{done.id}" not in stuck_part


def test_status_says_nothing_is_stuck_when_all_is_well():
    ReconcileTick.objects.create(started_at=timezone.now(), finished_at=timezone.now())
    output = run("emg_status")
    assert "Requests (0)" in output and "Cluster jobs (0)" in output
    assert sections(output)[2].strip() == "nothing stuck"


def test_a_job_whose_state_a_recent_tick_read_unchanged_is_not_stuck(tmp_path):
    """Ticks do not rewrite a job they found unchanged: its last check is the tick's read of every awaited job."""
    quiet = declare(tmp_path, "quiet-job")
    ClusterJob.objects.filter(id=quiet.id).update(
        state=ClusterJobState.RUNNING, slurm_job_id="31339", state_checked_at=long_ago(7200)
    )
    ReconcileTick.objects.create(
        started_at=long_ago(3600), finished_at=long_ago(3600), job_states_read_at=long_ago(3600)
    )
    assert f"job #{quiet.id} (Slurm 31339, RUNNING) not checked for 1h" in sections(run("emg_status"))[2]

    ReconcileTick.objects.create(
        started_at=timezone.now(), finished_at=timezone.now(), job_states_read_at=timezone.now()
    )
    _, jobs_part, stuck_part = sections(run("emg_status"))
    assert re.search(rf"^{quiet.id} +quiet-job +31339 +RUNNING .* 0s +-$", jobs_part, re.M)
    assert f"job #{quiet.id}" not in stuck_part


def test_requeue_events_publishes_each_undispatched_event_with_progress():
    study = Study.objects.create(accession="PRJEB55502")
    first, second = (AnalysisRequest.objects.create(study=study) for _ in range(2))
    dispatched = AnalysisRequest.objects.create(study=study)
    OutboxEvent.objects.of(dispatched).update(dispatched_at=timezone.now())

    output = run("requeue_events")

    lines = output.splitlines()
    for number, request in enumerate((first, second), start=1):
        event = OutboxEvent.objects.of(request).get()
        assert f"[{number}/2] event {event.id} analysis-request {request.id}:generation:1: published" in lines
        assert event.published_at is not None and event.publish_attempts == 1
    assert lines[-1] == "published 2 of 2 event(s)"
    assert OutboxEvent.objects.of(dispatched).get().publish_attempts == 0


def test_requeue_events_with_nothing_to_do_says_so():
    assert run("requeue_events").strip() == "no undispatched events"


def tick_when_free() -> str:
    """Beat (if an e2e stack is up) takes the same lock every second: retry until ours is taken."""
    return wait_until(lambda: run("reconcile", "--once"), timeout=30, interval=0.2, message="a reconcile tick ran")


@pytest.mark.slurm
def test_reconcile_once_submits_a_declared_job_and_then_reports_its_end(slurm_cluster, tmp_path, settings):
    settings.EMG_CLUSTER_BACKEND = slurm_cluster
    job = declare(tmp_path, "reconcile-by-hand")

    output = tick_when_free()

    job.refresh_from_db()
    assert job.state == ClusterJobState.SUBMITTED and job.slurm_job_id
    assert f"submitted: {job.slurm_job_id}" in output.splitlines()
    try:
        ended = wait_until(
            lambda: (out := tick_when_free()) and f"{job.slurm_job_id} -> COMPLETED" in out and out,
            timeout=90,
            interval=1,
            message="a tick saw the job complete",
        )
    finally:
        subprocess.run(["scancel", job.slurm_job_id], check=False, timeout=30)
    assert "checked 1 awaited job(s) with Slurm" in ended
    assert ReconcileTick.objects.filter(finished_at__isnull=False).exists()


def test_reconcile_once_refuses_while_another_tick_holds_the_lock(reconciler_blocked):
    with pytest.raises(CommandError, match="another reconcile tick is running"):
        run("reconcile", "--once")


def test_reconcile_requires_once():
    with pytest.raises(CommandError, match="--once"):
        run("reconcile")


def test_status_shows_the_prefect_state_of_every_request_beyond_one_page_of_the_api(prefect_api_url):
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from tests.workers.flow_runs import awaiting_flow

    count = 300  # Prefect answers at most 200 runs per call
    with get_client(sync_client=True) as prefect:
        flow_runs = [prefect.create_flow_run(awaiting_flow).id for _ in range(count)]
        for flow_run_id in flow_runs[::7]:
            prefect.set_flow_run_state(flow_run_id, Running(), force=True)
    study = Study.objects.create(accession="PRJEB55599")
    AnalysisRequest.objects.bulk_create(
        AnalysisRequest(study=study, status="WAITING", flow_run_id=flow_run_id) for flow_run_id in flow_runs
    )

    requests_part = sections(run("emg_status"))[0]

    rows = {line.split()[5]: line.split()[6] for line in requests_part.splitlines() if "PRJEB55599" in line}
    assert len(rows) == count
    assert {rows[str(flow_run_id)] for flow_run_id in flow_runs[::7]} == {"Running"}
    assert set(rows.values()) == {"Running", "Pending"}
