"""A study created flagged for processing writes one QC event; nothing else about a study does.

The declaration is flows.triggers' own (the product's settings name it), checked on the test database.
"""

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from emg import qc as study_qc
from emg.models import OutboxEvent, Study
from flows.deployments import READ_QC_DEPLOYMENT, READ_QC_TRIGGER
from flows.triggers import study_created, study_flagged_without_event
from workers.reconcile.prune import prune_history
from workers.reconciler import TickReport

pytestmark = pytest.mark.django_db


def qc_events(study: Study) -> list[OutboxEvent]:
    return list(OutboxEvent.objects.of(study).filter(trigger=READ_QC_TRIGGER))


def test_a_study_created_flagged_writes_one_event_for_the_qc_deployment(django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        study = Study.objects.create(accession="PRJEB40012", process_on_create=True)

    [event] = qc_events(study)
    assert (event.run_key, event.parameters) == (str(study.id), {"study_id": study.id})
    assert study_created.deployment == READ_QC_DEPLOYMENT and len(callbacks) == 1
    study.title = "renamed"
    study.save()
    assert qc_events(study) == [event]


def test_a_study_created_unflagged_or_flagged_later_writes_none():
    study = Study.objects.create(accession="PRJEB40001")
    study.process_on_create = True
    study.save()

    assert qc_events(study) == []


def test_flagged_studies_bulk_created_without_events_are_found_for_the_sweep():
    flagged, unflagged = Study.objects.bulk_create(
        [Study(accession="PRJEB40012", process_on_create=True), Study(accession="PRJEB40002")]
    )
    later = timezone.now() + timedelta(seconds=1)

    assert list(study_flagged_without_event(later)) == [flagged]
    assert list(study_flagged_without_event(flagged.created_at - timedelta(seconds=1))) == []  # still in grace
    assert unflagged not in study_flagged_without_event(later)


def test_events_of_finished_qc_runs_are_pruned_and_never_made_again(settings):
    settings.EMG_PRUNE_AFTER_DAYS = 30
    long_ago = timezone.now() - timedelta(days=31)
    finished, running = (
        Study.objects.create(accession=accession, process_on_create=True) for accession in ("PRJEB40012", "PRJEB40001")
    )
    for study, done in ((finished, True), (running, False)):
        flow_run_id = uuid.uuid4()
        OutboxEvent.objects.of(study).update(dispatched_at=long_ago, flow_run_id=flow_run_id)
        qc = study_qc.begin(study, flow_run_id, [])
        if done:
            study_qc.finish(qc, [], {"passed": []})
    Study.objects.filter(id__in=[finished.id, running.id]).update(created_at=long_ago)

    report = TickReport()
    prune_history(None, report)

    assert report.pruned == {"events": 1}
    assert qc_events(finished) == [] and len(qc_events(running)) == 1
    assert list(study_flagged_without_event(timezone.now())) == []  # its QC has begun: no second run
