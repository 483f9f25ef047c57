"""A JobWait changes only by compare-and-set (emg.waits), each change writing its history entry.

Real PostgreSQL. The races are made to happen, not hoped for: the first writer holds its change
uncommitted, the second is seen blocked on the row's lock, then the first commits.
"""

import threading
import uuid
from collections.abc import Callable

import pytest
from django.db import connection, transaction

from devstack.processes import wait_until
from emg import waits
from emg.models import AnalysisRequest, ClusterJob, JobWait, Study
from slurm_adapter import JobSpec

pytestmark = pytest.mark.django_db(transaction=True)


def make_job(tmp_path, name: str = "emg-waited-for") -> ClusterJob:
    spec = JobSpec(name=name, command=("true",), work_dir=str(tmp_path), time_limit_minutes=1, memory_mb=64, cpus=1)
    return ClusterJob.objects.declare(
        name=name, fingerprint=uuid.uuid4().hex, spec=spec.to_dict(), input_hashes={}, policy={}
    )


def make_wait(tmp_path, step: str = "analysis", flow_run_id: uuid.UUID | None = None) -> JobWait:
    study, _ = Study.objects.get_or_create(accession="PRJEB40001")
    request = AnalysisRequest.objects.create(study=study)
    job = make_job(tmp_path, name=f"emg-{step}")
    wait = waits.attach(flow_run_id or uuid.uuid4(), step, job.id, request.id)
    assert wait is not None
    return wait


def history_of(wait: JobWait) -> list[tuple[str, str]]:
    return [(entry["state"], entry["detail"]) for entry in JobWait.objects.get(id=wait.id).history]


def blocked(backend_pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT cardinality(pg_blocking_pids(%s)) > 0", [backend_pid])
        return bool(cursor.fetchone()[0])


def race(first: Callable[[], object], second: Callable[[], object]) -> tuple[object, object]:
    """`first` applied and held uncommitted; `second`, on another connection, blocked on the row it
    holds; then `first` commits and `second` decides. What each returned."""
    answer: dict[str, object] = {}
    started = threading.Event()

    def run_second() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                answer["pid"] = cursor.fetchone()[0]
            started.set()
            answer["second"] = second()
        except Exception as error:  # reported by the main thread
            answer["error"] = error
            started.set()
        finally:
            connection.close()

    thread = threading.Thread(target=run_second)
    with transaction.atomic():
        first_answer = first()
        thread.start()
        assert started.wait(timeout=30)
        assert "error" not in answer, answer.get("error")
        wait_until(lambda: blocked(int(answer["pid"])), timeout=30, message="the second writer waits on the row lock")
    thread.join(timeout=30)
    assert not thread.is_alive() and "error" not in answer, answer.get("error")
    return first_answer, answer["second"]


def test_attaching_opens_the_wait_with_one_entry_and_attaching_again_adds_none(tmp_path):
    wait = make_wait(tmp_path)
    assert waits.attach(wait.flow_run_id, wait.step, wait.job_id, wait.request_id) == wait

    assert history_of(wait) == [("opened", f"waits at analysis for job #{wait.job_id}")]


def test_a_tick_and_the_flow_releasing_the_same_wait_at_once_release_it_once_with_one_entry(tmp_path):
    wait = make_wait(tmp_path)

    by_tick, by_flow = race(
        lambda: waits.release([wait.id], "tick", "its flow run was resumed"),
        lambda: waits.release_for_run(wait.flow_run_id, [wait.job_id], "flow", "its jobs had ended"),
    )

    assert (by_tick, by_flow) == (1, 0)
    assert history_of(wait)[1:] == [("released", "by the tick: its flow run was resumed")]
    assert JobWait.objects.get(id=wait.id).released_at is not None


def test_releasing_a_released_wait_again_changes_nothing(tmp_path):
    wait = make_wait(tmp_path)
    assert waits.release([wait.id], "flow", "its jobs had ended") == 1
    released_at = JobWait.objects.get(id=wait.id).released_at

    assert waits.release([wait.id], "tick", "its flow run is gone") == 0
    assert waits.release_for_run(wait.flow_run_id, [wait.job_id], "flow", "its jobs had ended") == 0

    assert JobWait.objects.get(id=wait.id).released_at == released_at
    assert [state for state, _ in history_of(wait)] == ["opened", "released"]


def test_a_round_opened_from_a_stale_read_does_not_apply(tmp_path):
    wait = make_wait(tmp_path)
    read = waits.rounds_read(wait.flow_run_id, [wait.job_id])
    assert waits.open_round(read) == 1

    assert waits.open_round(read) is None

    assert JobWait.objects.get(id=wait.id).suspensions == 1
    assert history_of(wait)[1:] == [("reopened", "round 1")]


def test_two_processes_of_one_flow_run_opening_a_round_from_the_same_read_open_it_once(tmp_path):
    wait = make_wait(tmp_path)
    read = waits.rounds_read(wait.flow_run_id, [wait.job_id])

    first, second = race(lambda: waits.open_round(read), lambda: waits.open_round(read))

    assert (first, second) == (1, None)
    assert JobWait.objects.get(id=wait.id).suspensions == 1
    assert [state for state, _ in history_of(wait)] == ["opened", "reopened"]


def test_a_round_opens_all_the_waits_read_or_none_of_them(tmp_path):
    flow_run_id = uuid.uuid4()
    assembly = make_wait(tmp_path, "assembly", flow_run_id)
    analysis = make_wait(tmp_path, "analysis", flow_run_id)
    read = waits.rounds_read(flow_run_id, [assembly.job_id, analysis.job_id])
    assert waits.open_round({assembly.id: read[assembly.id]}) == 1  # one of them moves on

    assert waits.open_round(read) is None

    assert JobWait.objects.get(id=analysis.id).suspensions == 0
    assert [state for state, _ in history_of(analysis)] == ["opened"]
    assert waits.open_round(waits.rounds_read(flow_run_id, [assembly.job_id, analysis.job_id])) == 2
    assert history_of(analysis)[1:] == history_of(assembly)[2:] == [("reopened", "round 2")]


def test_each_change_of_a_wait_appends_its_entry_in_the_order_they_happened(tmp_path):
    wait = make_wait(tmp_path)
    rounds = lambda: waits.rounds_read(wait.flow_run_id, [wait.job_id])  # noqa: E731

    assert waits.open_round(rounds()) == 1
    assert waits.release([wait.id], "tick", "its flow run was resumed") == 1
    assert waits.open_round(rounds()) == 2
    assert waits.release_for_run(wait.flow_run_id, [wait.job_id], "flow", "its jobs had ended") == 1

    assert history_of(wait) == [
        ("opened", f"waits at analysis for job #{wait.job_id}"),
        ("reopened", "round 1"),
        ("released", "by the tick: its flow run was resumed"),
        ("reopened", "round 2"),
        ("released", "by the flow: its jobs had ended"),
    ]
    times = [entry["at"] for entry in JobWait.objects.get(id=wait.id).history]
    assert times == sorted(times)


def test_saving_a_wait_read_before_its_release_does_not_undo_the_release(tmp_path):
    wait = make_wait(tmp_path)
    assert waits.release([wait.id], "tick", "its flow run is gone") == 1

    wait.step = "analysis"
    wait.save()

    saved = JobWait.objects.get(id=wait.id)
    assert saved.released_at is not None
    assert [entry["state"] for entry in saved.history] == ["opened", "released"]


def test_a_wait_inserted_by_a_writer_that_predates_the_history_starts_with_an_empty_one(tmp_path):
    job = make_job(tmp_path)
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO emg_jobwait (flow_run_id, step, job_id, suspensions, created_at)"
            " VALUES (%s, 'analysis', %s, 0, now()) RETURNING id",
            [uuid.uuid4(), job.id],
        )
        wait_id = cursor.fetchone()[0]

    assert JobWait.objects.get(id=wait_id).history == []
    assert waits.release([wait_id], "tick", "its flow run is gone") == 1
    assert [entry["state"] for entry in JobWait.objects.get(id=wait_id).history] == ["released"]
