"""Publishing an outbox event onto the real broker Redis: the sweep's republish is a compare-and-set
on the in-flight record, so sweeps running at once send one task per event between them."""

import base64
import json
import threading
import uuid

import pytest
import redis
from django.conf import settings as django_settings

from emg.models import AnalysisRequest, OutboxEvent, Study
from emg.outbox import DISPATCH_TASK_NAME, forget_lost_in_flight, in_flight_key, publish, settle

# Not transactional: the rows stay invisible to the session stack's sweep, if it is running.
pytestmark = pytest.mark.django_db


@pytest.fixture
def quiet_queue(settings):
    """A dispatch queue and in-flight record of this test's own, which no worker consumes, on the session's Redis."""
    name = f"outbox-test-{uuid.uuid4().hex[:8]}"
    settings.EMG_INSTANCE_NAMESPACE = name
    settings.EMG_DISPATCH_QUEUE = f"emg.{name}.dispatch"
    client = redis.Redis.from_url(django_settings.CELERY_BROKER_URL)
    yield client
    client.delete(settings.EMG_DISPATCH_QUEUE, in_flight_key(), *client.keys(f"_kombu.binding*{name}*"))


def tasks_for(client: redis.Redis, event_id) -> int:
    """Dispatch tasks for this event waiting in the queue (a message's body is [args, kwargs, options])."""
    messages = [json.loads(raw) for raw in client.lrange(django_settings.EMG_DISPATCH_QUEUE, 0, -1)]
    return sum(
        1
        for message in messages
        if message["headers"]["task"] == DISPATCH_TASK_NAME
        and json.loads(base64.b64decode(message["body"]))[0] == [str(event_id)]
    )


def an_event() -> OutboxEvent:
    """A saved request's event, published as the save's commit would publish it."""
    request = AnalysisRequest.objects.create(study=Study.objects.create(accession="PRJEB55601"))
    event = OutboxEvent.objects.of(request).get()
    assert publish(event.id)
    return event


def test_sweeps_racing_over_one_event_send_it_once(quiet_queue):
    event = an_event()
    settle(event.id)  # whatever the save's own publish left: the event looks lost, as after an outage
    quiet_queue.delete(django_settings.EMG_DISPATCH_QUEUE)
    racers = 8
    start = threading.Barrier(racers)
    sent: list[bool] = []

    def sweep() -> None:
        start.wait()
        sent.append(publish(event.id, unless_in_flight=True))

    threads = [threading.Thread(target=sweep) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(sent) == [False] * (racers - 1) + [True]
    assert tasks_for(quiet_queue, event.id) == 1


def test_a_settled_event_is_sent_again_and_an_unsettled_one_is_not(quiet_queue):
    event = an_event()
    assert not publish(event.id, unless_in_flight=True)  # the save's publish is still in flight
    settle(event.id)
    assert publish(event.id, unless_in_flight=True)
    assert not publish(event.id, unless_in_flight=True)


def test_an_in_flight_record_older_than_its_limit_is_taken_for_a_lost_task(quiet_queue, settings):
    event = an_event()
    assert not publish(event.id, unless_in_flight=True)
    settings.EMG_OUTBOX_IN_FLIGHT_MAX_SECONDS = 0
    forget_lost_in_flight()
    assert publish(event.id, unless_in_flight=True)
