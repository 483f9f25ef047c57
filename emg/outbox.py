"""Publishing outbox events onto Redis, for the Celery consumer in `workers`.

The database is the source of truth: a publish that fails (Redis down, broker slow) is
logged and left to the sweep, never raised into the transaction that saved the model.
"""

import logging
import time
import uuid
from functools import cache
from typing import TYPE_CHECKING

import redis
from celery import Celery
from django.conf import settings
from django.contrib.contenttypes.models import ContentType
from django.db import models, transaction
from django.db.models import F
from django.utils import timezone

from emg.models import OutboxEvent

if TYPE_CHECKING:
    from emg.triggers import Trigger

logger = logging.getLogger(__name__)

# The contract between this producer and the consumer in workers.tasks.
DISPATCH_TASK_NAME = "emg.dispatch_event"
# One event per run key of a trigger (OutboxEvent's unique constraint).
UNIQUE_KEY = ("trigger", "run_key")


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


def forget_lost_in_flight() -> None:
    """An entry older than EMG_OUTBOX_IN_FLIGHT_MAX_SECONDS is taken for a task lost some other way."""
    _redis().zremrangebyscore(in_flight_key(), "-inf", time.time() - settings.EMG_OUTBOX_IN_FLIGHT_MAX_SECONDS)


def settle(event_id: uuid.UUID | str) -> None:
    """The event's dispatch task is done (dispatched, superseded, or out of retries): not in flight."""
    _redis().zrem(in_flight_key(), str(event_id))


def record(trigger: "Trigger", instance: models.Model) -> OutboxEvent | None:
    """Write the trigger's event for `instance`, in the caller's transaction; None if its run key
    has one already.

    One statement, `INSERT ... ON CONFLICT DO NOTHING RETURNING`, whether or not the key is new:
    `get_or_create`'s look-up and savepoint were three more round trips inside the save, and a
    plain INSERT of a key that exists would abort the saving transaction.
    """
    event = OutboxEvent(
        id=uuid.uuid4(),
        trigger=trigger.name,
        content_type=ContentType.objects.get_for_model(type(instance)),
        object_id=instance.pk,
        run_key=trigger.run_key(instance),
        parameters=trigger.parameters(instance),
        created_at=timezone.now(),
    )
    connection = transaction.get_connection()
    fields = OutboxEvent._meta.concrete_fields
    columns = ", ".join(connection.ops.quote_name(field.column) for field in fields)
    placeholders = ", ".join(["%s"] * len(fields))
    values = [field.get_db_prep_save(getattr(event, field.attname), connection) for field in fields]
    columns_of = {field.name: field.column for field in fields}
    conflict = ", ".join(connection.ops.quote_name(columns_of[name]) for name in UNIQUE_KEY)
    table = connection.ops.quote_name(OutboxEvent._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({columns}) VALUES ({placeholders}) ON CONFLICT ({conflict}) DO NOTHING RETURNING 1",
            values,
        )
        written = cursor.fetchone() is not None
    if not written:
        return None
    event._state.adding = False
    return event


def publish_after_commit(event: OutboxEvent) -> None:
    transaction.on_commit(lambda: publish(event.id), robust=True)


def publish(event_id: uuid.UUID | str, *, unless_in_flight: bool = False) -> bool:
    """Send the event's dispatch task, recorded in flight first (so no sweep sends a second while it lives).

    The record of which events have a task in the broker (queued, running or retrying) is kept in
    the broker's own Redis, beside the queue: a Redis that comes back empty has lost the tasks and
    the record together, so the sweep publishes those events again at once.

    `unless_in_flight` (the sweep) makes the record a compare-and-set: the task is sent only by the
    caller whose `ZADD NX` added the entry, so two sweeps running at once (on two worker processes)
    send one task between them, not one each.
    """
    try:
        claimed = _redis().zadd(in_flight_key(), {str(event_id): time.time()}, nx=unless_in_flight)
    except Exception as error:  # the broker is down: the sweep will publish it again
        return _not_published(event_id, error, attempted=False)
    if unless_in_flight and not claimed:
        return False
    try:
        _producer().send_task(DISPATCH_TASK_NAME, args=[str(event_id)], queue=settings.EMG_DISPATCH_QUEUE, retry=False)
    except Exception as error:  # any broker failure: the sweep will publish it again
        try:
            settle(event_id)
        except Exception:  # the broker is down: its record went with it
            pass
        return _not_published(event_id, error)
    _record_publish(event_id, published_at=timezone.now())
    return True


def _not_published(event_id: uuid.UUID | str, error: Exception, *, attempted: bool = True) -> bool:
    logger.warning("event %s not published (%s); the outbox sweep will retry it", event_id, error)
    _record_publish(event_id, attempted=attempted, last_error=f"publish failed: {error}"[:2000])
    return False


def _record_publish(event_id: uuid.UUID | str, *, attempted: bool = True, **fields: object) -> None:
    """Count the attempt and record its outcome, in one statement after the send.

    Called after the save's transaction committed, so it is a commit of its own; waiting for its
    WAL flush was most of what publishing added to a save, and its p99 (bench/event_latency.py).
    On PostgreSQL it does not wait for the flush (`synchronous_commit` off for this transaction
    only): a crash may lose this bookkeeping, never the event, and then the sweep publishes the
    event again, which the consumer's idempotency makes harmless. Inside a caller's transaction it
    is left as it is, since that would change the caller's commit.
    """
    if attempted:
        fields["publish_attempts"] = F("publish_attempts") + 1
    connection = transaction.get_connection()
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        OutboxEvent.objects.filter(id=event_id).update(**fields)
        return
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")
        OutboxEvent.objects.filter(id=event_id).update(**fields)
