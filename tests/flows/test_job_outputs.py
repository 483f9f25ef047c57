"""Each cluster job's directory is named by its fingerprint, and an ended job is reused only while
its declared outputs still hash to the manifest recorded when it ended."""

from pathlib import Path

import pytest

from emg.models import ClusterJob, ClusterJobState
from emg.policies import ResubmitPolicy, Reuse
from flows.cluster_jobs import JOB_DIR, declare_job, manifest_problems, record_manifest
from slurm_adapter import JobSpec

pytestmark = pytest.mark.django_db

OUTPUTS = ("contigs.fasta", "stats.json")


@pytest.fixture(autouse=True)
def work_dir(settings, tmp_path):
    settings.EMG_WORK_DIR = tmp_path
    return tmp_path


def spec(k: int) -> JobSpec:
    return JobSpec(
        name="emg-assembly-PRJEB1",
        command=("assemble", "--k", str(k), "--outdir", f"{JOB_DIR}/results"),
        work_dir=JOB_DIR,
    )


def completed(job: ClusterJob, contents: str = "ACGT") -> ClusterJob:
    outdir = Path(job.output_dir)
    outdir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        (outdir / name).write_text(f"{name} {contents}\n")
    ClusterJob.objects.filter(id=job.id).update(state=ClusterJobState.COMPLETED)
    job.refresh_from_db()
    return job


def test_a_job_works_and_writes_in_a_directory_named_by_its_fingerprint_and_no_other_job_does(work_dir):
    one, other = declare_job(spec(21), outputs=OUTPUTS), declare_job(spec(31), outputs=OUTPUTS)

    for job in (one, other):
        directory = work_dir / "jobs" / job.fingerprint
        assert job.spec["work_dir"] == str(directory)
        assert job.output_dir == str(directory / "results")
        assert job.spec["command"][-1] == str(directory / "results")
        assert job.outputs == sorted(OUTPUTS) and job.output_manifest is None
    assert one.fingerprint != other.fingerprint and one.output_dir != other.output_dir


def test_the_fingerprint_does_not_depend_on_where_the_work_dir_is(settings, tmp_path):
    first = declare_job(spec(21))
    ClusterJob.objects.all().delete()
    settings.EMG_WORK_DIR = tmp_path / "elsewhere"
    assert declare_job(spec(21)).fingerprint == first.fingerprint


def test_the_manifest_is_recorded_once_and_an_intact_job_is_reused():
    job = completed(declare_job(spec(21), outputs=OUTPUTS))

    manifest = record_manifest(job)

    assert set(manifest) == set(OUTPUTS) and all(len(digest) == 64 for digest in manifest.values())
    assert declare_job(spec(21), outputs=OUTPUTS, policy=ResubmitPolicy(reuse=Reuse.IF_SUCCEEDED)).id == job.id
    assert ClusterJob.objects.get(id=job.id).manifest_recorded_at is not None


@pytest.mark.parametrize("change", ["delete", "alter", "truncate"])
def test_an_output_changed_after_the_job_ended_means_the_job_is_declared_again(change):
    job = completed(declare_job(spec(21), outputs=OUTPUTS))
    record_manifest(job)
    contigs = Path(job.output_dir) / "contigs.fasta"
    if change == "delete":
        contigs.unlink()
    elif change == "alter":
        contigs.write_text("contigs.fasta ACGA\n")
    else:
        contigs.write_text("")

    assert manifest_problems(job)
    again = declare_job(spec(21), outputs=OUTPUTS)

    assert again.id != job.id and again.fingerprint == job.fingerprint and again.state == ClusterJobState.DECLARED
    assert again.output_dir == job.output_dir and again.output_manifest is None


def test_an_ended_job_no_flow_saw_end_is_hashed_when_first_considered_for_reuse():
    job = completed(declare_job(spec(21), outputs=OUTPUTS))
    assert job.output_manifest is None

    assert declare_job(spec(21), outputs=OUTPUTS).id == job.id
    assert set(ClusterJob.objects.get(id=job.id).output_manifest) == set(OUTPUTS)


def test_a_completed_job_missing_a_declared_output_is_not_reused():
    job = declare_job(spec(21), outputs=OUTPUTS)
    ClusterJob.objects.filter(id=job.id).update(state=ClusterJobState.COMPLETED)

    assert declare_job(spec(21), outputs=OUTPUTS).id != job.id
