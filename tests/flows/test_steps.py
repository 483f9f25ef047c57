"""flows.steps, in a flow run of this process: what run_cluster_jobs checks before it declares
anything, and how it verifies the ended jobs. The jobs here are ended by the test (as the cluster
and the reconciler would end them) from the `on_wait` hook, just before the flow would suspend, so
the flow finds them ended and never suspends; the served fan-out on real Slurm, suspension and
resume included, is tests/e2e/test_cluster_steps.py."""

from pathlib import Path

import pytest
from prefect import flow

from emg.models import ClusterJob, ClusterJobState, JobWait
from flows.cluster_jobs import JOB_DIR, RESULTS, suspend_key
from flows.steps import ClusterStep, ClusterStepFailed, run_cluster_job, run_cluster_jobs
from slurm_adapter import JobSpec

pytestmark = pytest.mark.django_db(transaction=True)

OUTPUT = "n.txt"


@pytest.fixture(autouse=True)
def work_dir(settings, tmp_path, prefect_api_url):
    """The flows run in this process, on the session's Prefect server; their jobs work under tmp_path."""
    settings.EMG_WORK_DIR = tmp_path
    return tmp_path


def step(index: int, name: str | None = None) -> ClusterStep:
    spec = JobSpec(
        name=f"emg-test-step-{index}", command=("count", str(index), f"{JOB_DIR}/{RESULTS}"), work_dir=JOB_DIR
    )
    return ClusterStep(f"count[{index}]" if name is None else name, spec, outputs=[OUTPUT])


def end(job: ClusterJob, outcome: str) -> None:
    """What the cluster leaves and the reconciler records: outputs and COMPLETED, or a log and FAILED."""
    if outcome == "COMPLETED":
        Path(job.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(job.output_dir) / OUTPUT).write_text(f"{job.name}\n")
        ClusterJob.objects.filter(id=job.id).update(state=ClusterJobState.COMPLETED, slurm_job_id=str(job.id))
    elif outcome == "NO OUTPUT":
        ClusterJob.objects.filter(id=job.id).update(state=ClusterJobState.COMPLETED, slurm_job_id=str(job.id))
    else:
        log = Path(job.spec["work_dir"]) / "job.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(f"line {n}\n" for n in range(20)) + f"{job.name}: out of reads\n")
        ClusterJob.objects.filter(id=job.id).update(
            state=ClusterJobState.FAILED, slurm_job_id=str(job.id), exit_code=3, raw_state="FAILED", log_path=str(log)
        )


@flow(name="emg-test-steps-in-process")
def counting(outcomes: list[str], names: list[str] | None = None) -> list[int]:
    """Fans out one job per outcome; each ends with its outcome when the flow is about to wait."""
    steps = [step(index, names[index] if names else None) for index in range(len(outcomes))]
    by_name = dict(zip((each.name for each in steps), outcomes, strict=True))

    calls = []

    def waiting(pending: dict[str, ClusterJob]) -> None:
        calls.append(sorted(pending))
        for name, job in pending.items():
            end(job, by_name[name])

    jobs = run_cluster_jobs(steps, on_wait=waiting)
    assert calls == [sorted(by_name)]  # once, with every step: none had ended
    return [job.id for job in jobs]


def test_the_jobs_come_back_in_the_order_of_the_steps_ended_and_with_their_outputs_recorded():
    job_ids = counting(["COMPLETED"] * 5)

    jobs = ClusterJob.objects.in_bulk(job_ids)
    assert [jobs[job_id].name for job_id in job_ids] == [f"emg-test-step-{index}" for index in range(5)]
    assert all(set(jobs[job_id].output_manifest or {}) == {OUTPUT} for job_id in job_ids)
    waits = JobWait.objects.order_by("id")
    assert [(wait.step, wait.job_id) for wait in waits] == [(f"count[{i}]", job_id) for i, job_id in enumerate(job_ids)]


def test_failed_steps_are_named_each_with_its_outcome_and_log_tail_and_only_once_all_have_ended():
    with pytest.raises(ClusterStepFailed) as raised:
        counting(["COMPLETED", "FAILED", "COMPLETED", "NO OUTPUT"])

    failure = raised.value
    assert failure.steps == ["count[1]", "count[3]"]
    message = str(failure)
    assert message.startswith("2 of 4 cluster steps failed (count[1], count[3]):\n")
    failed = ClusterJob.objects.get(name="emg-test-step-1")
    assert f"count[1] failed: Slurm job {failed.slurm_job_id} ended FAILED (exit code 3)\nlast log lines:\n" in message
    # The last 8 lines: the job's own last words, not the start of its log.
    assert "emg-test-step-1: out of reads" in message and "line 13" in message and "line 12" not in message
    assert "count[3]: cluster job #" in message and "completed but its declared output" in message
    # A step that completed beside the failures has its outputs recorded all the same.
    assert set(ClusterJob.objects.get(name="emg-test-step-2").output_manifest or {}) == {OUTPUT}


def test_one_failed_step_reads_as_its_own_failure():
    @flow(name="emg-test-one-step")
    def one() -> ClusterJob:
        def waiting(pending):
            end(pending["alone"], "FAILED")

        return run_cluster_job(step(0, "alone"), on_wait=waiting)

    with pytest.raises(ClusterStepFailed) as raised:
        one()

    assert str(raised.value).startswith("alone failed: Slurm job ")
    assert raised.value.steps == ["alone"]


def test_a_step_given_twice_in_one_call_is_refused_before_anything_is_declared():
    with pytest.raises(ValueError, match="given more than once: count"):
        counting(["COMPLETED"] * 3, names=["count", "other", "count"])

    assert not ClusterJob.objects.exists() and not JobWait.objects.exists()


@pytest.mark.parametrize("name", ["", "x" * 65])
def test_a_step_name_the_wait_could_not_record_is_refused(name):
    with pytest.raises(ValueError, match="a step's name must be 1 to 64 characters"):
        step(0, name)


def test_jobs_that_ended_before_the_flow_looked_are_not_waited_for():
    first = counting(["COMPLETED"] * 3)

    @flow(name="emg-test-steps-reused")
    def again() -> list[int]:
        def waiting(pending):
            raise AssertionError(f"waited for {sorted(pending)}, which had ended")

        return [job.id for job in run_cluster_jobs([step(index) for index in range(3)], on_wait=waiting)]

    assert again() == first  # another flow run: identical completed jobs, reused by their fingerprint


def test_the_suspend_key_names_the_set_of_jobs_and_the_round():
    assert suspend_key([7, 3, 5], 1) == suspend_key([3, 5, 7], 1) == suspend_key([5, 3, 7, 3], 1)
    keys = {suspend_key([3, 5, 7], 1), suspend_key([3, 5, 8], 1), suspend_key([3, 5, 7], 2), suspend_key([3], 1)}
    assert len(keys) == 4
    assert suspend_key([3, 5, 7], 1).startswith("jobs-3-n3-") and suspend_key([3, 5, 7], 2).endswith("-wait-2")
