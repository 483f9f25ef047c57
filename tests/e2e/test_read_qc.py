"""A study created flagged for processing has its raw reads QC'd on Slurm, one job per run as one array.

From the model save through the outbox, Redis, Celery and Prefect to the runner, the reconciler
and real Slurm, on the session's stack; ENA is the recorded fake (PRJEB40012: twelve runs, the
last of them degraded). Written with the flow authors' kit (tests/flowkit.py).
"""

import pytest

from emg.models import RunQC, Study, StudyQC
from flows.deployments import READ_QC_TRIGGER
from tests.flowkit import run_started_by

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.django_db(transaction=True)]

TWELVE_RUNS = "PRJEB40012"
DEGRADED_RUN = "ERR4801212"


def test_a_flagged_study_is_qc_d_run_by_run_in_one_array_and_the_degraded_run_fails_qc(stack, ena_server):
    run = run_started_by(Study.objects.create(accession=TWELVE_RUNS, process_on_create=True), READ_QC_TRIGGER)

    # The flow records the QC as its last step; Prefect's state follows.
    states = run.wait_for_state("Completed", timeout=300)

    qc = StudyQC.objects.get(flow_run_id=run.flow_run_id)
    assert qc.finished_at is not None and "error" not in qc.summary, qc.summary
    results = {result.run.accession: result for result in RunQC.objects.filter(study_qc=qc).select_related("run")}
    assert len(results) == 12 == len(qc.run_accessions)
    assert qc.runs_passed == 11 and qc.summary["passed"] == sorted(set(results) - {DEGRADED_RUN})
    degraded = results[DEGRADED_RUN]
    assert not degraded.passed and "Q30" in degraded.failed_because
    assert qc.summary["failed"] == {DEGRADED_RUN: degraded.failed_because}
    # 200 pairs of 100 bp per run, counted by the pipeline from the served files.
    assert {(result.reads, result.bases) for result in results.values()} == {(400, 40_000)}
    assert qc.total_reads == 12 * 400
    # One array for the twelve jobs, each job a task of it, each run once; one suspension, one resume.
    jobs = run.jobs()
    assert {job.id for job in jobs.values()} == {result.job_id for result in results.values()}
    [array_tag] = {job.array_tag for job in jobs.values()}
    assert array_tag and sorted(job.array_index for job in jobs.values()) == list(range(12))
    assert {job.state for job in jobs.values()} == {"COMPLETED"}
    assert len({job.slurm_job_id for job in jobs.values()}) == 12  # one task each (its tag is the array's)
    assert states.count("Suspended") == 1 and states.count("Resuming") == 1, states
