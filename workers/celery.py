"""The Celery app: the event consumer and the beat reconciler run here."""

import os

import django
from celery import Celery
from celery.signals import celeryd_after_setup, worker_process_init
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "emg.settings")
django.setup()

from django.conf import settings  # noqa: E402  (needs django.setup())

VISIBILITY_TIMEOUT = int(os.environ.get("EMG_CELERY_VISIBILITY_TIMEOUT", "300"))

# A worker's roles name the queues it consumes (emg.settings: EMG_DISPATCH_QUEUE, EMG_RECONCILE_QUEUE).
# Deployments run one worker per role, the reconcile one with concurrency 1. Without
# EMG_WORKER_ROLES a worker consumes both queues (or what -Q names): enough on a laptop, where a
# dispatch backlog may then delay ticks.
QUEUES_BY_ROLE = {"dispatch": settings.EMG_DISPATCH_QUEUE, "reconcile": settings.EMG_RECONCILE_QUEUE}


def worker_queues(roles: str) -> list[str]:
    """The queues of a comma-separated list of roles; an unknown or empty list is refused by name."""
    names = [role.strip() for role in roles.split(",") if role.strip()]
    unknown = sorted(set(names) - set(QUEUES_BY_ROLE))
    if unknown or not names:
        raise ValueError(f"EMG_WORKER_ROLES={roles!r}: expected a comma-separated list of {sorted(QUEUES_BY_ROLE)}")
    return [QUEUES_BY_ROLE[name] for name in dict.fromkeys(names)]


ROLE_QUEUES = worker_queues(os.environ["EMG_WORKER_ROLES"]) if "EMG_WORKER_ROLES" in os.environ else None

app = Celery("emg-workers")
# Where the Redis transport keeps delivered, unacknowledged tasks (a global "unacked" by default):
# an instance of its own, so two instances on one Redis never restore, or count, each other's.
UNACKED_KEY = f"emg:{settings.EMG_INSTANCE_NAMESPACE}:unacked"

app.conf.update(
    broker_url=settings.CELERY_BROKER_URL,
    # An event is acknowledged only after its flow run exists; a worker that dies mid-task
    # gets its event redelivered, and the idempotency key makes the second delivery harmless.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        # Our tasks take seconds; an unacked one is redelivered after this long...
        "visibility_timeout": VISIBILITY_TIMEOUT,
        # ...plus the restore sweep's period, which by default is 10 s x 10 (only every 10th
        # check scans): here a tenth of the timeout, 1 to 10 s, and every check scans.
        "unacked_restore_interval": max(1, min(10, VISIBILITY_TIMEOUT // 10)),
        "unacked_restore_throttle": 1,
        "unacked_key": UNACKED_KEY,
        "unacked_index_key": f"{UNACKED_KEY}:index",
        "unacked_mutex_key": f"{UNACKED_KEY}:mutex",
        "socket_timeout": 5,
        "socket_connect_timeout": 5,
    },
    worker_hijack_root_logger=False,
    task_queues=[Queue(name) for name in QUEUES_BY_ROLE.values()],
    task_default_queue=settings.EMG_DISPATCH_QUEUE,
    task_routes={"workers.tasks.reconcile": {"queue": settings.EMG_RECONCILE_QUEUE}},
    # Flower shows tasks only from their events.
    worker_send_task_events=True,
    task_send_sent_event=True,
    # RedBeat keeps the schedule in Redis behind a lock: a second beat process waits instead of
    # sending every task twice.
    beat_scheduler="workers.beat:RestartSafeRedBeatScheduler",
    redbeat_redis_url=settings.REDIS_URL,
    redbeat_key_prefix=f"emg:{settings.EMG_INSTANCE_NAMESPACE}:redbeat",
    redbeat_lock_timeout=max(30, int(5 * settings.EMG_RECONCILE_INTERVAL_SECONDS)),
    beat_max_loop_interval=max(1, int(settings.EMG_RECONCILE_INTERVAL_SECONDS)),
    beat_schedule={
        "reconcile-cluster-jobs": {
            "task": "workers.tasks.reconcile",
            "schedule": settings.EMG_RECONCILE_INTERVAL_SECONDS,
            # A tick that waited behind others is stale: the next one does the same work.
            "options": {"expires": settings.EMG_RECONCILE_INTERVAL_SECONDS},
        },
        "sweep-outbox": {
            "task": "workers.tasks.sweep_outbox",
            "schedule": settings.EMG_OUTBOX_SWEEP_SECONDS,
            "options": {"expires": settings.EMG_OUTBOX_SWEEP_SECONDS},
        },
    },
)
app.autodiscover_tasks(["workers"], related_name="tasks", force=True)


@celeryd_after_setup.connect
def consume_the_queues_of_its_roles(sender, instance, **_kwargs) -> None:
    # After -Q is applied: a worker started with roles consumes exactly their queues.
    if ROLE_QUEUES is not None:
        instance.app.amqp.queues.select(ROLE_QUEUES)


@worker_process_init.connect
def import_prefect_before_first_task(**_kwargs) -> None:
    # Prefect's lazy imports take seconds; pay them when the worker starts, not on the first event.
    import prefect.deployments  # noqa: F401
