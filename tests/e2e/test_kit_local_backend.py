"""The flow authors' kit on the local backend: the QC flow, from a study's save to its recorded QC,
with its cluster jobs run as local processes instead of Slurm jobs (the `local_stack` fixture).

The same test as on the real cluster (tests/e2e/test_read_qc.py), but for what the backend does
differently: the local backend submits no job arrays, so the twelve jobs are twelve submissions.
"""

import pytest

from emg.models import RunQC, Study, StudyQC
from flows.deployments import READ_QC_TRIGGER
from tests.flowkit import run_started_by

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_flagged_study_is_qc_d_with_its_jobs_on_local_processes(local_stack, ena_server):
    run = run_started_by(Study.objects.create(accession="PRJEB40012", process_on_create=True), READ_QC_TRIGGER)
    states = run.wait_for_state("Completed", timeout=300)

    qc = StudyQC.objects.get(flow_run_id=run.flow_run_id)
    assert qc.finished_at is not None and qc.runs_passed == 11, qc.summary
    assert RunQC.objects.filter(study_qc=qc).count() == 12
    jobs = run.jobs()
    assert len(jobs) == 12 and {job.state for job in jobs.values()} == {"COMPLETED"}
    assert {job.array_tag for job in jobs.values()} == {""}  # submitted one by one, not as an array
    assert all(job.spec["work_dir"] and job.log_path for job in jobs.values())
    assert states.count("Suspended") == 1 and states.count("Resuming") == 1, states
