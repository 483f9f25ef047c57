"""A write its caller marks safe to repeat is sent once more when the connection dies under it, and
a flow whose connection dies under it runs again from the top in the same flow run.

The connection is cut mid-statement by the server (`pg_terminate_backend` on the statement's own
session: what a restart does to every session), on the test database.
"""

import asyncio
import logging

import pytest
from django.db import OperationalError, connection, transaction
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.context import get_run_context

from emg.connections import FROM_THE_TOP_ATTEMPTS, from_the_top_if_disconnected, once_more_if_disconnected
from emg.models import Study

pytestmark = pytest.mark.django_db(transaction=True)


def time_out_a_statement() -> None:
    """A statement the server refuses (statement timeout) on a connection that still works."""
    with connection.cursor() as cursor:
        cursor.execute("SET statement_timeout = 10")
        try:
            cursor.execute("SELECT pg_sleep(1)")
        finally:
            cursor.execute("RESET statement_timeout")


def cut_off_mid_statement() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")


def test_an_operation_cut_off_by_the_server_runs_once_more_on_a_new_connection(caplog):
    tries = []

    def create_study() -> Study:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            tries.append(cursor.fetchone()[0])
        if len(tries) == 1:
            cut_off_mid_statement()
        return Study.objects.create(accession="PRJEB40001", title="cut off once")

    with caplog.at_level(logging.WARNING, logger="emg.connections"):
        study = once_more_if_disconnected(create_study, what="creating a study")

    assert Study.objects.filter(id=study.id).exists()
    assert len(tries) == 2 and tries[0] != tries[1]  # the second try on a new session
    assert "creating a study: the database connection was lost" in caplog.text


def test_a_transaction_cut_off_is_not_repeated():
    tries = []

    def inside_a_transaction() -> None:
        tries.append(1)
        cut_off_mid_statement()

    with pytest.raises(OperationalError), transaction.atomic():
        once_more_if_disconnected(inside_a_transaction, what="a transaction")
    assert tries == [1]


def test_an_error_on_a_connection_that_still_works_is_not_repeated():
    tries = []

    def too_slow() -> None:
        tries.append(1)
        time_out_a_statement()

    with pytest.raises(OperationalError, match="statement timeout"):
        once_more_if_disconnected(too_slow, what="a slow query")
    assert tries == [1]


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def test_a_flow_cut_off_mid_statement_runs_again_from_the_top_in_the_same_flow_run(prefect_api_url, caplog):
    passes: list[tuple[str, int]] = []

    @flow(name="emg-test-cut-off-flow", persist_result=False)
    @from_the_top_if_disconnected
    def cut_off_once(accession: str) -> tuple[str, int]:
        passes.append((str(get_run_context().flow_run.id), backend_pid()))
        if len(passes) == 1:
            cut_off_mid_statement()
        study, _ = Study.objects.get_or_create(accession=accession, defaults={"title": "cut off once"})
        return passes[-1][0], study.id

    with caplog.at_level(logging.WARNING, logger="emg.connections"):
        flow_run_id, study_id = cut_off_once("PRJEB40001")

    assert Study.objects.get(id=study_id).accession == "PRJEB40001"
    assert len(passes) == 2
    assert passes[0][0] == passes[1][0] == flow_run_id  # one flow run
    assert passes[0][1] != passes[1][1]  # the second pass on a new session
    assert "cut_off_once: the database connection was lost" in caplog.text

    async def state_history() -> list[str]:
        async with get_client() as client:
            return [state.name for state in await client.read_flow_run_states(flow_run_id)]

    assert "Failed" not in asyncio.run(state_history())


def test_a_flow_whose_connection_is_lost_at_every_pass_fails_after_a_bounded_number_of_passes():
    passes = []

    @from_the_top_if_disconnected
    def cut_off_always() -> None:
        passes.append(1)
        cut_off_mid_statement()

    with pytest.raises(OperationalError):
        cut_off_always()
    assert len(passes) == FROM_THE_TOP_ATTEMPTS


def test_a_flow_failing_for_another_reason_is_not_run_again():
    passes = []

    @from_the_top_if_disconnected
    def too_slow() -> None:
        passes.append(1)
        time_out_a_statement()

    @from_the_top_if_disconnected
    def refused() -> None:
        passes.append(2)
        Study.objects.create(accession="PRJEB40001", title="first")
        Study.objects.create(accession="PRJEB40001", title="the same accession")

    with pytest.raises(OperationalError, match="statement timeout"):
        too_slow()
    with pytest.raises(Exception, match="accession"):
        refused()
    assert passes == [1, 2]
