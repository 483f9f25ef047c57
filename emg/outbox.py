"""Publishing outbox events onto Redis, for the Celery consumer in `workers`.

The database is the source of truth: a publish that fails (Redis down, broker slow) is
logged and left to the sweep, never raised into the transaction that saved the model.
"""

import logging
import time
import uuid
from collections.abc import Iterable
from functools import cache

import redis
from celery import Celery
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from emg.models import AnalysisRequest, OutboxEvent

logger = logging.getLogger(__name__)

# The contract between this producer and the consumer in workers.tasks.
DISPATCH_TASK_NAME = "emg.dispatch_event"


@cache
def _producer() -> Celery:
    app = Celery("emg-producer", broker=settings.CELERY_BROKER_URL)
    app.conf.broker_connection_retry = False
    app.conf.broker_transport_options = {"socket_timeout": 2, "socket_connect_timeout": 2, "max_retries": 0}
    return app


def _redis() -> redis.Redis:
    # The broker's own Redis, whatever the broker setting is now (tests point it elsewhere).
    return _redis_at(settings.CELERY_BROKER_URL)


@cache
def _redis_at(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def in_flight_key() -> str:
    return f"emg:{settings.EMG_INSTANCE_NAMESPACE}:outbox:in-flight"


def in_flight(event_ids: Iterable[uuid.UUID | str]) -> set[str]:
    """Which of these events have a dispatch task in the broker (queued, running or retrying).

    Kept in the broker's own Redis, beside the queue: a Redis that comes back empty has lost the
    tasks and this record together, so the sweep publishes those events again at once. An entry
    older than EMG_OUTBOX_IN_FLIGHT_MAX_SECONDS is taken for a task lost some other way.
    """
    ids = [str(event_id) for event_id in event_ids]
    if not ids:
        return set()
    client = _redis()
    client.zremrangebyscore(in_flight_key(), "-inf", time.time() - settings.EMG_OUTBOX_IN_FLIGHT_MAX_SECONDS)
    scores = client.zmscore(in_flight_key(), ids)
    return {event_id for event_id, score in zip(ids, scores, strict=True) if score is not None}


def settle(event_id: uuid.UUID | str) -> None:
    """The event's dispatch task is done (dispatched, superseded, or out of retries): not in flight."""
    _redis().zrem(in_flight_key(), str(event_id))


def record_run_event(request: AnalysisRequest) -> OutboxEvent | None:
    """Write the run event for the request's current generation; None if it already exists."""
    event, created = OutboxEvent.objects.get_or_create(
        topic=OutboxEvent.Topic.RUN_ANALYSIS,
        request=request,
        generation=request.generation,
        defaults={"id": uuid.uuid4()},
    )
    return event if created else None


def publish_after_commit(event: OutboxEvent) -> None:
    transaction.on_commit(lambda: publish(event.id), robust=True)


def publish(event_id: uuid.UUID) -> bool:
    """Send the event's dispatch task, recorded in flight first (so no sweep sends a second while it lives)."""
    OutboxEvent.objects.filter(id=event_id).update(publish_attempts=F("publish_attempts") + 1)
    try:
        _redis().zadd(in_flight_key(), {str(event_id): time.time()})
        _producer().send_task(DISPATCH_TASK_NAME, args=[str(event_id)], retry=False)
    except Exception as error:  # any broker failure: the sweep will publish it again
        try:
            settle(event_id)
        except Exception:  # the broker is down: its record went with it
            pass
        logger.warning("event %s not published (%s); the outbox sweep will retry it", event_id, error)
        OutboxEvent.objects.filter(id=event_id).update(last_error=f"publish failed: {error}"[:2000])
        return False
    OutboxEvent.objects.filter(id=event_id).update(published_at=timezone.now())
    return True
