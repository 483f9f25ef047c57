"""A saved AnalysisRequest runs the MGnify flow through Redis, Celery, Prefect, the reconciler and real Slurm."""

import pytest
from prefect.client.orchestration import get_client

from devstack.processes import wait_until
from emg.models import (
    Analysis,
    AnalysisRequest,
    Assembly,
    ClusterJob,
    JobWait,
    OutboxEvent,
    Run,
    Sample,
    TendedRun,
)
from tests.e2e.requests import (
    assert_each_job_ran_once_in_slurm,
    final_request,
    jobs_of,
    new_request,
    state_names,
    suspended_on_pending_assembly,
)
from tests.slurm import cluster_blocked

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.django_db(transaction=True)]


def test_a_study_is_fetched_assembled_analysed_and_moved_through_one_slurm_job_per_step(stack, ena_server):
    request = final_request(new_request("PRJEB40001"), stack)

    assert request.status == AnalysisRequest.Status.COMPLETED, request.status_reason
    assert Sample.objects.filter(study=request.study).count() == 2
    assert Run.objects.filter(study=request.study).count() == 2
    assembly = Assembly.objects.get(request=request)
    assert assembly.contigs > 0 and assembly.total_length > 10_000 and not assembly.analysis_skipped_reason
    analysis = Analysis.objects.get(request=request)
    assert analysis.summary["orfs"]["count"] > 0
    jobs = jobs_of(request)
    assert set(jobs) == {"assembly", "analysis", "data move"}
    assert all(job.state == "COMPLETED" for job in jobs.values())
    assert_each_job_ran_once_in_slurm(jobs.values())
    assert jobs["assembly"].trace["summary"]["by_status"] == {"COMPLETED": 6}  # 2 samples x 2 + 2
    # The flow marks the request COMPLETED as its last step; Prefect's state follows a moment later.
    names = wait_until(
        lambda: (names := state_names(request.flow_run_id))[-1] == "Completed" and names,
        timeout=30,
        message="the flow run completed",
    )
    assert names.count("Suspended") == 3
    assert OutboxEvent.objects.of(request).get().dispatched_at is not None
    # Its request counts its re-runs: the run has no TendedRun of its own to be re-run twice by.
    assert not TendedRun.objects.filter(flow_run_id=request.flow_run_id).exists()


def test_a_small_assembly_skips_analysis_and_says_why(stack):
    request = final_request(new_request("PRJEB40002"), stack)

    assert request.status == AnalysisRequest.Status.COMPLETED, request.status_reason
    assert "assembly too small to analyse" in Assembly.objects.get(request=request).analysis_skipped_reason
    jobs = jobs_of(request)
    assert set(jobs) == {"assembly", "data move"}
    assert_each_job_ran_once_in_slurm(jobs.values())
    assert not Analysis.objects.filter(request=request).exists()


def test_rejected_reads_fail_the_request_with_slurm_state_exit_code_and_log(stack):
    request = final_request(new_request("PRJEB40666"), stack)

    assert request.status == AnalysisRequest.Status.FAILED
    assert request.current_step == "assembly"
    assert "FAILED" in request.status_reason and "exit code 3" in request.status_reason
    # The pipeline's own words, from the job log: which file, which record.
    assert "ERR4806661_2.fastq.gz, record 600" in request.status_reason
    job = jobs_of(request)["assembly"]
    assert (job.state, job.exit_code) == ("FAILED", 3)
    assert_each_job_ran_once_in_slurm([job])


@pytest.mark.parametrize(
    ("accession", "reason"),
    [
        ("PRJEB40003", "has no read runs"),
        ("PRJEB40404", "does not know study PRJEB40404"),
        ("PRJEB49999", "does not know study PRJEB49999"),
    ],
)
def test_a_study_ena_cannot_give_fails_clearly_and_submits_nothing(stack, accession, reason):
    request = final_request(new_request(accession), stack)

    assert request.status == AnalysisRequest.Status.FAILED
    assert reason in request.status_reason
    assert not ClusterJob.objects.exists()


def test_ena_server_errors_are_retried(stack, ena_server):
    ena_server.reset_counts()
    request = final_request(new_request("PRJEB40500"), stack)

    assert request.status == AnalysisRequest.Status.COMPLETED, request.status_reason
    # Two answers of HTTP 500, then the study; then its read runs.
    assert ena_server.request_count("PRJEB40500") == 4


def test_early_resume_reruns_the_flow_from_the_top_and_it_suspends_again_without_resubmitting(stack):
    with cluster_blocked():
        request = new_request("PRJEB40001")
        wait_until(lambda: AnalysisRequest.objects.get(id=request.id).flow_run_id, timeout=60)
        request.refresh_from_db()
        suspended_on_pending_assembly(request)

        with get_client(sync_client=True) as client:
            client.resume_flow_run(request.flow_run_id)
        wait_until(
            lambda: JobWait.objects.get(request=request, step="assembly").suspensions == 2,
            timeout=60,
            message="the resumed flow suspended a second time",
        )

    request = final_request(request, stack)
    assert request.status == AnalysisRequest.Status.COMPLETED, request.status_reason
    assert_each_job_ran_once_in_slurm(jobs_of(request).values())


def test_killed_runner_restarts_and_the_flow_reattaches_without_refetching_or_resubmitting(stack, ena_server):
    with cluster_blocked():
        request = new_request("PRJEB40001")
        wait_until(lambda: AnalysisRequest.objects.get(id=request.id).flow_run_id, timeout=60)
        request.refresh_from_db()
        suspended_on_pending_assembly(request)
        fetched_before = ena_server.request_count("PRJEB40001")
        stack.runner.kill()
    stack.runner.start()

    request = final_request(request, stack)
    assert request.status == AnalysisRequest.Status.COMPLETED, request.status_reason
    assert ena_server.request_count("PRJEB40001") == fetched_before  # cached: not fetched again
    assert_each_job_ran_once_in_slurm(jobs_of(request).values())


def test_rerun_reuses_the_assembly_until_its_samplesheet_is_edited(stack, settings):
    first = final_request(new_request("PRJEB40001"), stack)
    assert first.status == AnalysisRequest.Status.COMPLETED, first.status_reason
    first_assembly = jobs_of(first)["assembly"]

    first.rerun()
    second = final_request(first, stack)
    assert second.status == AnalysisRequest.Status.COMPLETED, second.status_reason
    assert JobWait.objects.get(flow_run_id=second.flow_run_id, step="assembly").job_id == first_assembly.id

    samplesheet = settings.EMG_WORK_DIR / "studies" / "PRJEB40001" / "samplesheet.csv"
    original = samplesheet.read_text()
    samplesheet.write_text("\n".join(original.splitlines()[:2]) + "\n")  # an operator drops the second run
    try:
        second.rerun()
        third = final_request(second, stack)
    finally:
        samplesheet.write_text(original)
    assert third.status == AnalysisRequest.Status.COMPLETED, third.status_reason
    edited_assembly = JobWait.objects.get(flow_run_id=third.flow_run_id, step="assembly").job
    assert edited_assembly.id != first_assembly.id
    assert edited_assembly.fingerprint != first_assembly.fingerprint
    assert_each_job_ran_once_in_slurm([first_assembly, edited_assembly])
