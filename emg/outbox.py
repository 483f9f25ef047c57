"""Publishing outbox events onto Redis, for the Celery consumer in `workers`.

The database is the source of truth: a publish that fails (Redis down, broker slow) is
logged and left to the sweep, never raised into the transaction that saved the model.
"""

import logging
import uuid
from functools import cache

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
    OutboxEvent.objects.filter(id=event_id).update(publish_attempts=F("publish_attempts") + 1)
    try:
        _producer().send_task(DISPATCH_TASK_NAME, args=[str(event_id)], queue=settings.EMG_DISPATCH_QUEUE,
                                retry=False)
    except Exception as error:  # any broker failure: the sweep will publish it again
        logger.warning("event %s not published (%s); the outbox sweep will retry it", event_id, error)
        OutboxEvent.objects.filter(id=event_id).update(last_error=f"publish failed: {error}"[:2000])
        return False
    OutboxEvent.objects.filter(id=event_id).update(published_at=timezone.now())
    return True
