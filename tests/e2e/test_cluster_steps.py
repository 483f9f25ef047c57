"""A served flow fans out cluster jobs with flows.steps.run_cluster_jobs, on the session stack and real
Slurm: one suspension and one resume for all of them, results in the order asked, a failure that
names its step and carries its log, a run from the top that declares nothing new, and a large
fan-out given to Slurm as one job array whose task that ran out of memory is retried alone."""

import json
import os
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.states import Scheduled

from devstack.processes import ManagedProcess, python_module, wait_until
from emg.models import ClusterJob, JobWait, ReconcileTick
from tests.e2e.fan_out_flow import FAN_OUT_DEPLOYMENT
from tests.e2e.requests import state_names

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def fan_out_deployment(stack):
    """A runner of its own serving the fan-out flow (the stack's serves the MGnify flow only), on the
    stack's environment: the stack's workers submit its jobs and its reconciler resumes it."""
    runner = ManagedProcess(
        "fan-out-runner", python_module("tests.e2e.fan_out_flow"), env=stack.env, log_dir=stack.log_dir
    ).start()
    try:
        with get_client(sync_client=True) as client:
            deployment = wait_until(
                lambda: client.read_deployment_by_name(FAN_OUT_DEPLOYMENT),
                timeout=60,
                message="the fan-out flow is deployed",
            )
        yield deployment.id, runner
    finally:
        runner.stop()


class FanOut:
    """One run of the fan-out flow: its jobs wait for `go`; what the flow saw is in its journal."""

    def __init__(
        self, deployment, tmp_path: Path, count: int, failing: tuple[int, ...] = (), hungry: tuple[int, ...] = ()
    ):
        deployment_id, self.runner = deployment
        self.tag = uuid.uuid4().hex[:10]
        # Where the Slurm jobs can see it: the stack's work dir.
        self.go = Path(os.environ["EMG_WORK_DIR"]) / f"go-{self.tag}"
        self.journal = tmp_path / "journal.jsonl"
        parameters = {
            "tag": self.tag,
            "count": count,
            "failing": list(failing),
            "hungry": list(hungry),
            "go": str(self.go),
            "journal": str(self.journal),
        }
        with get_client(sync_client=True) as client:
            self.flow_run_id = client.create_flow_run_from_deployment(deployment_id, parameters=parameters).id

    def entries(self) -> list[dict]:
        if not self.journal.exists():
            return []
        return [json.loads(line) for line in self.journal.read_text().splitlines()]

    def states(self) -> list[str]:
        return state_names(self.flow_run_id)

    def wait_for_state(self, name: str, *, count: int = 1, timeout: float = 180) -> list[str]:
        try:
            return wait_until(
                lambda: (names := self.states())[-1] == name and names.count(name) == count and names,
                timeout=timeout,
                interval=0.5,
                message=f"flow run {self.flow_run_id} is {name} (for the {count}. time)",
            )
        except AssertionError:
            print(self.runner.log_tail(100))
            raise

    def jobs(self) -> list[ClusterJob]:
        return list(ClusterJob.objects.filter(name__startswith=f"emg-test-fan-out-{self.tag}-").order_by("id"))

    def waits(self) -> list[JobWait]:
        return list(JobWait.objects.filter(flow_run_id=self.flow_run_id).order_by("id"))


def test_twenty_jobs_fanned_out_suspend_the_flow_once_and_come_back_in_order_and_a_rerun_declares_nothing(
    fan_out_deployment, tmp_path
):
    run = FanOut(fan_out_deployment, tmp_path, count=20)
    names = [f"echo[{index}]" for index in range(20)]

    run.wait_for_state("Suspended")
    [waiting] = run.entries()
    assert list(waiting["waiting"]) == names  # every job declared before the one suspension
    declared = list(waiting["waiting"].values())
    assert len(set(declared)) == 20 and sorted(declared) == [job.id for job in run.jobs()]
    assert [wait.suspensions for wait in run.waits()] == [1] * 20
    run.go.touch()

    states = run.wait_for_state("Completed")
    [_, done] = run.entries()
    assert done["done"] == [
        [name, job_id, "COMPLETED", str(index)] for index, (name, job_id) in enumerate(zip(names, declared))
    ]
    assert states.count("Suspended") == 1 and states.count("Resuming") == 1, states
    for wait in run.waits():
        assert [entry["state"] for entry in wait.history] == ["opened", "reopened", "released"], wait.history
        assert wait.suspensions == 1

    # The run again, from the top, as the reconciler re-runs a broken one: all found, none declared.
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run.flow_run_id, Scheduled(message="re-run by the test"), force=True)
    states = run.wait_for_state("Completed", count=2)
    [_, _, again] = run.entries()
    assert again == done
    assert states.count("Suspended") == 1, states
    assert len(run.jobs()) == 20 and [wait.suspensions for wait in run.waits()] == [1] * 20


def test_a_failed_job_among_many_fails_the_steps_with_its_name_and_log_once_the_others_have_run(
    fan_out_deployment, tmp_path
):
    run = FanOut(fan_out_deployment, tmp_path, count=6, failing=(3,))

    run.wait_for_state("Suspended")
    run.go.touch()
    run.wait_for_state("Completed")

    [waiting, failed] = run.entries()
    assert failed["failed"] == ["echo[3]"]
    jobs = {job.id: job for job in run.jobs()}
    failing = jobs[waiting["waiting"]["echo[3]"]]
    assert failed["message"].startswith(
        f"echo[3] failed: Slurm job {failing.slurm_job_id} ended FAILED (exit code 7)\nlast log lines:\n"
    ), failed["message"]
    assert f"job 3 of {run.tag}: record 600 is truncated" in failed["message"]
    others = [job for job in jobs.values() if job.id != failing.id]
    assert len(others) == 5 and all(job.state == "COMPLETED" for job in others)


def sbatch_calls_and_arrays(since_tick: int) -> tuple[int, list[int]]:
    """The sbatch commands the reconciler ran in its ticks after `since_tick`, and the size of each
    job array they submitted."""
    reports = ReconcileTick.objects.filter(id__gt=since_tick, finished_at__isnull=False).values_list(
        "report", flat=True
    )
    calls = sum(int((report.get("slurm_calls") or {}).get("sbatch", 0)) for report in reports)
    return calls, [int(size) for report in reports for size in (report.get("arrays") or {}).values()]


def test_two_hundred_jobs_of_one_shape_go_as_one_array_and_the_task_out_of_memory_is_retried_alone(
    fan_out_deployment, tmp_path
):
    last_tick = ReconcileTick.objects.order_by("-id").values_list("id", flat=True).first() or 0
    run = FanOut(fan_out_deployment, tmp_path, count=200, hungry=(17,))

    run.wait_for_state("Suspended", timeout=240)
    [waiting] = run.entries()
    declared = list(waiting["waiting"].values())
    assert len(set(declared)) == 200
    jobs = wait_until(
        lambda: (found := run.jobs()) and all(job.slurm_job_id for job in found) and found,
        timeout=60,
        message="all 200 jobs submitted",
    )
    # One array: each job one of its tasks, in the order they were claimed.
    [array_tag] = {job.array_tag for job in jobs}
    [array_id] = {job.slurm_job_id.split("_")[0] for job in jobs}
    assert sorted(job.array_index for job in jobs) == list(range(200))
    assert all(job.slurm_job_id == f"{array_id}_{job.array_index}" for job in jobs)
    run.go.touch()

    states = run.wait_for_state("Completed", timeout=240)
    assert states.count("Suspended") == 1 and states.count("Resuming") == 1, states
    [_, done] = run.entries()
    assert done["done"] == [
        [f"echo[{index}]", job_id, "COMPLETED", str(index)] for index, job_id in enumerate(declared)
    ]
    sbatch_calls, arrays = sbatch_calls_and_arrays(last_tick)
    # The array, and the retry of the one task that ran out of memory: on its own, with more memory.
    assert (sbatch_calls, arrays) == (2, [200])
    hungry = ClusterJob.objects.get(id=waiting["waiting"]["echo[17]"])
    assert (hungry.retries, hungry.spec["memory_mb"], hungry.array_tag) == (1, 512, "")
    assert hungry.slurm_job_id.isdigit()
    seen = [entry["state"] for entry in hungry.history]
    assert "OUT_OF_MEMORY" in seen and seen[-1] == "COMPLETED", hungry.history
    others = ClusterJob.objects.filter(id__in=declared).exclude(id=hungry.id)
    assert {(job.retries, job.spec["memory_mb"], job.array_tag) for job in others} == {(0, 64, array_tag)}
