"""A served parent flow starts ten child flows (runs of their own deployment) with
flows.child_flows.run_child_flows, on the session stack and real Slurm: the parent waits suspended
holding no process and is resumed once, with the children's results in order; a parent killed
with its runner while it starts them and run again from the top re-attaches to the children it
made and starts none twice; cancelling the parent cancels every child and its Slurm job.

The parent and child deployments are served by a runner of this module's own (`flows.serve` on
tests/family_settings.py), so killing it touches nothing else; the stack's workers submit the
children's jobs and its reconciler resumes children and parent.
"""

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.states import Cancelling, Scheduled

from devstack.processes import ManagedProcess, python_module, wait_until
from emg.models import ChildRun, ClusterJob, ClusterJobState, TendedRun
from tests.e2e.family_flows import CHILD_DEPLOYMENT, PARENT_DEPLOYMENT
from tests.e2e.requests import state_names
from tests.services import database_url

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.django_db(transaction=True)]

CHILDREN = 10


def family_process(stack, name: str, settings_module: str) -> ManagedProcess:
    return ManagedProcess(
        name,
        python_module("flows.serve"),
        env={**stack.env, "DJANGO_SETTINGS_MODULE": settings_module, "EMG_RUNNER_LIMIT": "12"},
        log_dir=stack.log_dir,
    ).start()


@pytest.fixture(scope="module")
def family_runner(stack):
    """The parent's runner and the children's, each its own process (flows.serve, on settings that
    name only its deployment in EMG_SERVED_DEPLOYMENTS): the parent's id and its runner."""
    parents = family_process(stack, "family-parent-runner", "tests.family_settings")
    children = family_process(stack, "family-child-runner", "tests.family_children_settings")
    try:
        with get_client(sync_client=True) as client:
            parent_id, _ = wait_until(
                lambda: (
                    client.read_deployment_by_name(PARENT_DEPLOYMENT).id,
                    client.read_deployment_by_name(CHILD_DEPLOYMENT).id,
                ),
                timeout=90,
                message="the parent and child flows are deployed",
            )
        yield parent_id, parents
    finally:
        parents.stop()
        children.stop()


class Family:
    """One run of the parent flow and its children; what the parent saw is in its journal."""

    def __init__(self, family_runner, tmp_path: Path, mode: str, count: int = CHILDREN, **more):
        deployment_id, self.runner = family_runner
        self.tag = uuid.uuid4().hex[:10]
        self.go = Path(os.environ["EMG_WORK_DIR"]) / f"go-{self.tag}"
        self.journal = tmp_path / "journal.jsonl"
        parameters = {
            "tag": self.tag,
            "count": count,
            "mode": mode,
            "go": str(self.go),
            "journal": str(self.journal),
            **more,
        }
        with get_client(sync_client=True) as client:
            self.flow_run_id = client.create_flow_run_from_deployment(deployment_id, parameters=parameters).id

    def entries(self) -> list[dict]:
        if not self.journal.exists():
            return []
        return [json.loads(line) for line in self.journal.read_text().splitlines()]

    def wait_for_state(self, name: str, *, count: int = 1, timeout: float = 120) -> list[str]:
        try:
            return wait_until(
                lambda: (names := state_names(self.flow_run_id))[-1] == name and names.count(name) == count and names,
                timeout=timeout,
                interval=0.5,
                message=f"parent flow run {self.flow_run_id} is {name} (for the {count}. time)",
            )
        except AssertionError:
            print(self.runner.log_tail(100))
            raise

    def children(self) -> list[ChildRun]:
        return list(ChildRun.objects.filter(parent_flow_run_id=self.flow_run_id).order_by("id"))

    def child_runs_in_prefect(self) -> dict:
        """Every flow run Prefect has for this parent's children, by id, with its state's name."""
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"child-of-{self.flow_run_id}"])),
                limit=200,
            )
        return {run.id: run.state.name for run in runs}

    def jobs(self) -> list[ClusterJob]:
        return list(ClusterJob.objects.filter(name__startswith=f"emg-test-child-{self.tag}-").order_by("id"))


def processes_of(flow_run_id) -> list[int]:
    """Processes on this machine running the flow run (Prefect's runner gives each its id in the environment)."""
    found = []
    marker = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def all_children_suspended(family: Family) -> bool:
    states = family.child_runs_in_prefect()
    return len(states) == CHILDREN and set(states.values()) == {"Suspended"}


def test_a_parent_of_ten_children_waits_suspended_holding_no_process_and_is_resumed_once_with_their_results_in_order(
    family_runner, tmp_path
):
    family = Family(family_runner, tmp_path, mode="job")

    family.wait_for_state("Suspended")
    wait_until(
        lambda: all_children_suspended(family), timeout=150, interval=1, message="every child suspended on its job"
    )
    assert processes_of(family.flow_run_id) == []  # the parent holds no process while its children run
    children = family.children()
    assert [child.key for child in children] == [f"child[{index}]" for index in range(CHILDREN)]
    assert {child.state for child in children} == {"RUNNING"}
    family.go.touch()

    states = family.wait_for_state("Completed", timeout=150)
    assert states.count("Suspended") == 1 and states.count("Resuming") == 1, states
    done = family.entries()[-1]  # each run from the top notes its start; the last one its results
    ids = [str(child.child_flow_run_id) for child in children]
    assert done["done"] == [
        [f"child[{index}]", ids[index], "COMPLETED", {"index": index, "output": str(index)}]
        for index in range(CHILDREN)
    ]
    for child in family.children():
        assert [entry["state"] for entry in child.history] == [
            "DECLARED",
            "CREATING",
            "RUNNING",
            "reopened",
            "COMPLETED",
            "released",
        ], child.history
    assert len(family.child_runs_in_prefect()) == CHILDREN
    assert len(family.jobs()) == CHILDREN and {job.state for job in family.jobs()} == {"COMPLETED"}


def test_a_child_whose_process_was_killed_is_rerun_in_place_and_its_parent_gets_its_result(family_runner, tmp_path):
    family = Family(family_runner, tmp_path, mode="quick", count=3, crashing=[1])

    family.wait_for_state("Completed", timeout=150)
    done = family.entries()[-1]["done"]
    assert [(key, state) for key, _, state, _ in done] == [(f"child[{index}]", "COMPLETED") for index in range(3)]
    crashed = family.children()[1]
    assert str(crashed.child_flow_run_id) == done[1][1]  # the same run, re-run in place: no second child
    names = state_names(crashed.child_flow_run_id)
    assert names.count("Crashed") == 1 and names[-1] == "Completed", names
    tended = TendedRun.objects.get(flow_run_id=crashed.child_flow_run_id)
    assert tended.reruns == 1 and tended.history[0]["detail"].startswith("re-run 1: flow run crashed")
    assert len(family.child_runs_in_prefect()) == 3


@contextmanager
def child_row_locked(child: ChildRun):
    """The row held FOR UPDATE by another connection: the parent blocks when it claims that child."""
    with psycopg.connect(database_url()) as connection:
        connection.execute(f"SELECT id FROM {ChildRun._meta.db_table} WHERE id = %s FOR UPDATE", [child.id])
        yield
        connection.rollback()


def blocked_on_child_update() -> bool:
    with psycopg.connect(database_url(), autocommit=True) as connection:
        return bool(
            connection.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query ILIKE %s",
                [f'UPDATE "{ChildRun._meta.db_table}"%'],
            ).fetchone()[0]
        )


def test_a_parent_killed_with_its_runner_while_starting_children_reattaches_to_them_when_run_again(
    family_runner, tmp_path
):
    family = Family(family_runner, tmp_path, mode="quick")
    # The parent declares all ten rows at once, then creates their runs in order: holding the last
    # row stops it, Running, after it made nine.
    declared = wait_until(
        lambda: len(rows := family.children()) == CHILDREN and rows, timeout=90, interval=0.02, message="ten declared"
    )
    with child_row_locked(declared[-1]):
        wait_until(blocked_on_child_update, timeout=30, message="the parent waits to claim its last child")
        made = family.child_runs_in_prefect()
        family.runner.kill()
    try:
        assert len(made) == CHILDREN - 1
        # SIGKILLed, its processes are gone once the kernel has torn them down: a moment, not at once.
        wait_until(
            lambda: processes_of(family.flow_run_id) == [], timeout=30, message="the parent's process died with it"
        )
    finally:
        family.runner.start()  # whatever the above found: the module's other tests need the runner
    # Running with no process: as the reconciler re-runs such a run in place, from the top (for a
    # request's run, once its heartbeats and its runner's lease have lapsed: tests/e2e/test_resilience.py).
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(family.flow_run_id, Scheduled(message="re-run by the test"), force=True)

    family.wait_for_state("Completed", timeout=150)
    done = family.entries()[-1]["done"]
    assert [entry[0] for entry in done] == [f"child[{index}]" for index in range(CHILDREN)]
    assert [entry[2] for entry in done] == ["COMPLETED"] * CHILDREN
    runs = family.child_runs_in_prefect()
    assert len(runs) == CHILDREN and set(runs.values()) == {"Completed"}  # none started twice
    assert {uuid.UUID(entry[1]) for entry in done} == set(runs) >= set(made)
    assert len(family.children()) == CHILDREN


def test_cancelling_the_parent_cancels_every_child_and_its_slurm_job(family_runner, tmp_path):
    family = Family(family_runner, tmp_path, mode="job")
    family.wait_for_state("Suspended")
    wait_until(
        lambda: all_children_suspended(family), timeout=150, interval=1, message="every child suspended on its job"
    )
    wait_until(
        lambda: len(jobs := family.jobs()) == CHILDREN and {job.state for job in jobs} == {ClusterJobState.RUNNING},
        timeout=90,
        message="every child's job runs in Slurm",
    )

    # As Prefect's UI cancels a run.
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(family.flow_run_id, Cancelling(message="cancelled by the test"), force=True)

    wait_until(
        lambda: {child.state for child in family.children()} == {"CANCELLED"},
        timeout=60,
        message="every child run ended cancelled",
    )
    assert set(family.child_runs_in_prefect().values()) == {"Cancelled"}
    jobs = wait_until(
        lambda: (jobs := family.jobs()) and {job.state for job in jobs} == {ClusterJobState.CANCELLED} and jobs,
        timeout=90,
        message="every child's Slurm job cancelled",
    )
    assert all(job.slurm_job_id for job in jobs)
    assert all(child.cancel_requested_at is not None for child in family.children())
    assert not family.go.exists()
