"""ENA's transient answers (server errors, rate limiting) are told apart from its verdicts on a study."""

import pytest

from devstack.ena_fake import FakeEnaServer
from flows.ena import STUDY_FIELDS, EnaError, EnaUnavailable, search


@pytest.fixture
def ena(settings):
    server = FakeEnaServer()
    settings.EMG_ENA_PORTAL_API = server.start()
    yield server
    server.stop()


def test_an_outage_started_at_any_moment_answers_its_statuses_in_order_and_then_the_data(ena):
    assert search("study", "PRJEB40001", STUDY_FIELDS)[0]["study_accession"] == "PRJEB40001"
    ena.fail_next("PRJEB40001", [(503, 2), (429, 1)])

    for status in (503, 503, 429):
        with pytest.raises(EnaUnavailable, match=f"HTTP {status}"):
            search("study", "PRJEB40001", STUDY_FIELDS)
    assert search("study", "PRJEB40001", STUDY_FIELDS)[0]["study_accession"] == "PRJEB40001"
    assert search("study", "PRJEB40002", STUDY_FIELDS)  # other studies were never affected


def test_rate_limiting_is_worth_retrying_but_a_bad_request_is_an_answer(ena):
    ena.fail_next("PRJEB40002", [(429, 1), (400, 1)])

    with pytest.raises(EnaUnavailable):
        search("study", "PRJEB40002", STUDY_FIELDS)
    with pytest.raises(EnaError, match="HTTP 400"):
        search("study", "PRJEB40002", STUDY_FIELDS)
