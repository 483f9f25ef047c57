"""A trigger declared beside its flow starts the flow from a model's save, with nothing of it in
emg or workers: the model, the flow and the trigger are tests.triggerapp's, a product of the
tests' own that only the test settings install (and name in EMG_TRIGGER_MODULES)."""

import uuid

import pytest
import redis
from django.contrib.contenttypes.models import ContentType
from django.db import transaction
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound

from devstack.processes import wait_until
from emg import triggers
from emg.models import AnalysisRequest, OutboxEvent, Study, TendedRun
from emg.outbox import in_flight_key, publish
from tests.triggerapp.models import Parcel
from tests.triggerapp.triggers import COURIER_DEPLOYMENT, paid_parcel
from workers.dispatch import dispatch_event, flow_run_id_by_key, idempotency_key


def events_of(parcel: Parcel) -> list[OutboxEvent]:
    return list(OutboxEvent.objects.of(parcel))


@pytest.mark.django_db
def test_a_change_of_the_field_to_the_value_writes_one_event_with_the_parameters_of_then(
    django_capture_on_commit_callbacks,
):
    with django_capture_on_commit_callbacks() as callbacks:
        parcel = Parcel.objects.create(label="books")
    assert events_of(parcel) == [] and callbacks == []

    parcel.label = "more books"
    parcel.save()
    assert events_of(parcel) == []

    parcel.status = Parcel.Status.PAID
    with django_capture_on_commit_callbacks() as callbacks:
        parcel.save()
    [event] = events_of(parcel)
    assert len(callbacks) == 1  # its publish, after the commit
    assert (event.trigger, event.run_key) == ("paid-parcel", f"parcel:{parcel.id}")
    assert event.parameters == {"parcel_id": parcel.id, "label": "more books"}
    assert event.content_type == ContentType.objects.get_for_model(Parcel) and event.object_id == parcel.id
    assert event.changed == parcel

    # Saved again still paid (read so, or kept in memory): no change to the value, no event.
    parcel.label = "renamed"
    parcel.save()
    Parcel.objects.get(id=parcel.id).save()
    assert events_of(parcel) == [event]


@pytest.mark.django_db
def test_a_row_made_with_the_value_already_counts_as_a_change_to_it():
    parcel = Parcel.objects.create(label="prepaid", status=Parcel.Status.PAID)
    [event] = events_of(parcel)
    assert event.parameters == {"parcel_id": parcel.id, "label": "prepaid"}


@pytest.mark.django_db
def test_a_second_change_to_the_value_under_the_same_run_key_writes_no_second_event():
    parcel = Parcel.objects.create(label="returned", status=Parcel.Status.PAID)
    parcel.status = Parcel.Status.NEW
    parcel.save()
    parcel.status = Parcel.Status.PAID
    parcel.save()  # the same run key: the one statement inserts nothing, and the save goes on
    assert len(events_of(parcel)) == 1
    assert Parcel.objects.get(id=parcel.id).status == Parcel.Status.PAID


@pytest.mark.django_db
def test_a_save_rolled_back_leaves_no_event_and_publishes_nothing(django_capture_on_commit_callbacks):
    parcel = Parcel.objects.create(label="cancelled order")
    with django_capture_on_commit_callbacks() as callbacks:
        with pytest.raises(RuntimeError):
            with transaction.atomic():
                parcel.status = Parcel.Status.PAID
                parcel.save()
                raise RuntimeError("the order fell through")
    assert events_of(parcel) == [] and callbacks == []


@pytest.mark.django_db
def test_an_event_of_a_trigger_not_declared_here_stays_undispatched_with_the_reason():
    study = Study.objects.create(accession="PRJEB77001")
    request = AnalysisRequest.objects.create(study=study)
    event = OutboxEvent.objects.create(
        id=uuid.uuid4(),
        trigger="declared-elsewhere",
        content_type=ContentType.objects.get_for_model(AnalysisRequest),
        object_id=request.id,
        run_key="elsewhere:1",
    )

    assert dispatch_event(event.id) is None

    event.refresh_from_db()
    assert event.dispatched_at is None and event.flow_run_id is None
    assert event.last_error == "unknown trigger 'declared-elsewhere'"


def test_two_triggers_may_not_share_a_name():
    with pytest.raises(ValueError, match="two triggers are named 'paid-parcel'"):
        triggers.on_create(
            Parcel,
            name="paid-parcel",
            deployment=COURIER_DEPLOYMENT,
            parameters=dict,
            run_key=str,
        )
    assert triggers.get("paid-parcel") is paid_parcel


def test_a_declaration_naming_a_field_the_model_lacks_fails_when_declared():
    from django.core.exceptions import FieldDoesNotExist

    with pytest.raises(FieldDoesNotExist):
        triggers.Trigger(
            name="misspelt",
            model=Parcel,
            on="change",
            field="stauts",
            to="PAID",
            deployment=COURIER_DEPLOYMENT,
            parameters=dict,
            run_key=str,
        )
    assert triggers.get("misspelt") is None


def served(prefect, deployment: str) -> bool:
    try:
        prefect.read_deployment_by_name(deployment)
    except ObjectNotFound:
        return False
    return True


def courier_runs(prefect) -> list:
    deployment = prefect.read_deployment_by_name(COURIER_DEPLOYMENT)
    return prefect.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_parcel_paid_starts_exactly_one_courier_run_end_to_end_and_redelivery_starts_no_other(stack):
    with get_client(sync_client=True) as prefect:
        wait_until(
            lambda: served(prefect, COURIER_DEPLOYMENT),
            timeout=60,
            message="the stack's runner serves the courier's deployment",
        )
        abandoned = Parcel.objects.create(label="abandoned cart")
        with pytest.raises(RuntimeError):
            with transaction.atomic():
                abandoned.status = Parcel.Status.PAID
                abandoned.save()
                raise RuntimeError("the payment bounced")

        parcel = Parcel.objects.create(label="telescope")
        with transaction.atomic():
            parcel.status = Parcel.Status.PAID
            parcel.save()

        wait_until(
            lambda: Parcel.objects.get(id=parcel.id).status == Parcel.Status.DELIVERED,
            timeout=120,
            message="the courier's flow run delivered the parcel",
        )
        [event] = events_of(parcel)
        wait_until(
            lambda: OutboxEvent.objects.get(id=event.id).dispatched_at is not None,
            timeout=30,
            message="the event is recorded dispatched",
        )
        event.refresh_from_db()
        [run] = courier_runs(prefect)
        assert run.id == event.flow_run_id
        namespace = stack.env["EMG_INSTANCE_NAMESPACE"]
        assert run.idempotency_key == idempotency_key(event) == f"{namespace}:paid-parcel:parcel:{parcel.id}"
        assert run.parameters == {"parcel_id": parcel.id, "label": "telescope"}
        wait_until(
            lambda: prefect.read_flow_run(run.id).state_type == StateType.COMPLETED,
            timeout=60,
            message="the courier's run completed",
        )
        delivered = Parcel.objects.get(id=parcel.id)
        assert delivered.deliveries == 1 and delivered.delivered_by.startswith(f"flow run {run.id} ")
        # Looked after by the reconciler until it ended (re-run had it crashed): then no longer.
        tended = wait_until(
            lambda: TendedRun.objects.filter(flow_run_id=run.id, ended_at__isnull=False).first(),
            timeout=60,
            message="the stack's reconciler saw the courier's run end",
        )
        assert (tended.started_by, tended.outcome, tended.reruns) == (
            f"trigger paid-parcel (run key parcel:{parcel.id})",
            "Completed",
            0,
        )

        # Delivered again through the broker, and consumed here: the run it made already.
        assert publish(event.id)
        assert dispatch_event(event.id) == run.id
        # As if a consumer had died after creating the run and before recording it: found again by
        # its key (the parcel is delivered, so the event is superseded), not made twice.
        OutboxEvent.objects.filter(id=event.id).update(dispatched_at=None, flow_run_id=None)
        assert dispatch_event(event.id) is None
        event.refresh_from_db()
        assert event.dispatched_at is not None and event.flow_run_id == run.id

        broker = redis.Redis.from_url(stack.env["REDIS_URL"])
        wait_until(
            lambda: broker.zscore(in_flight_key(), str(event.id)) is None,
            timeout=60,
            message="the stack's worker consumed the redelivery",
        )
        assert [r.id for r in courier_runs(prefect)] == [run.id]
        assert Parcel.objects.get(id=parcel.id).deliveries == 1
        # The rolled-back save left nothing to dispatch: no event, no run of its key.
        assert events_of(abandoned) == []
        assert flow_run_id_by_key(triggers.run_idempotency_key("paid-parcel", f"parcel:{abandoned.id}")) is None
