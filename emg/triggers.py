"""Declarative triggers: a change of a model's row starts a run of a Prefect deployment.

A flow's author declares, beside the flow, which change starts it (`on_create`, `on_change`,
`on_save`): the model, the deployment, the run's parameters and its run key. Modules of such
declarations are named in the EMG_TRIGGER_MODULES setting and imported when Django starts
(emg.apps), so neither `emg` nor `workers` changes for a new trigger.

What each trigger gets from the outbox (emg.outbox, workers.dispatch):

- its event is written in the transaction that saved the row (a rolled-back save leaves none) and
  published to the dispatch queue after that commit;
- a publish lost (Redis down, a worker killed) is made again by the outbox sweep, and rows that
  should have an event but have none (saved by `bulk_create` or an UPDATE) get one there, if the
  trigger says which they are (`missing`);
- one run key, one event (unique), and one flow run: its idempotency key
  `<namespace>:<trigger>:<run key>` makes Prefect answer a second create with the run it made,
  so a delivery repeated any number of times starts one run.
"""

import dataclasses
import importlib
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import models
from django.db.models.signals import post_init, post_save

if TYPE_CHECKING:
    from emg.models import OutboxEvent

logger = logging.getLogger(__name__)

_UNSEEN = object()


@dataclasses.dataclass(frozen=True, eq=False)
class Trigger:
    """One kind of change of one model, and the deployment a run of which it starts.

    `on` is when it fires, as the row is saved: "create" (the row is new), "change" (`field` now
    holds `to` and did not when the row was read; a new row holding it counts), or "save" (every
    save; the run key alone says whether this is a new run). `when`, if given, must also hold.

    `parameters(row)` are the run's parameters, computed when the event is written; `run_key(row)`
    names the run: the same key, the same run, however many times the change is seen (make it
    unique per run, e.g. "<id>:generation:<n>"). The row's model needs an integer primary key.

    Optional hooks, run by the dispatch consumer:
    - `is_current(row, event)`: False if the event was superseded since it was written (the row
      moved on, or ended): then no run is made, and the event is marked dispatched.
    - `on_dispatched(row, event, flow_run_id)`: in the transaction that marks the event
      dispatched, e.g. to record the run on the row.
    - `run_name(row, event)` and `tags(row, event)` of the flow run.

    For the outbox sweep, `missing(cutoff)` yields the rows saved before `cutoff` that should
    have an event and have none (e.g. made by `bulk_create`, which sends no signal); and for the
    reconciler's pruning, `prunable` is a Q over OutboxEvent of this trigger's events that may be
    deleted once dispatched long enough ago (events of a trigger without it are kept).

    `recover`: the reconciler re-runs the trigger's run in place when it crashes or falls silent
    (emg.tended_runs), as it does a request's; a run that failed gave its flow's own verdict.
    False for a trigger whose row looks after its run itself (the analysis request: emg.requests
    counts its re-runs).

    `flow`, if given, is the dotted path of the Prefect flow that `deployment` (its full name,
    "<flow name>/<deployment name>") is a deployment of: the runner (flows.serve) serves it.
    """

    name: str
    model: type[models.Model]
    deployment: str
    parameters: Callable[[Any], dict]
    run_key: Callable[[Any], str]
    on: str = "save"
    field: str | None = None
    to: Any = None
    when: Callable[[Any], bool] | None = None
    is_current: Callable[[Any, "OutboxEvent"], bool] | None = None
    on_dispatched: Callable[[Any, "OutboxEvent", Any], None] | None = None
    run_name: Callable[[Any, "OutboxEvent"], str] | None = None
    tags: Callable[[Any, "OutboxEvent"], list[str]] | None = None
    missing: Callable[[datetime], models.QuerySet] | None = None
    prunable: models.Q | None = None
    recover: bool = True
    flow: str | None = None
    select_related: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.on not in ("create", "change", "save"):
            raise ValueError(f"trigger {self.name}: `on` must be create, change or save, not {self.on!r}")
        if (self.on == "change") != (self.field is not None):
            raise ValueError(f"trigger {self.name}: a field is named for, and only for, on='change'")
        if self.field is not None:
            _attname(self.model, self.field)  # FieldDoesNotExist now, not at the first save
        if "/" not in self.deployment:
            raise ValueError(f"trigger {self.name}: deployment must be '<flow name>/<deployment name>'")

    @property
    def deployment_name(self) -> str:
        """The deployment's own name, without its flow's."""
        return self.deployment.split("/", 1)[1]

    def fires(self, instance: models.Model, created: bool) -> bool:
        """Whether this save of `instance` is the change this trigger waits for."""
        if self.on == "create" and not created:
            return False
        if self.on == "change":
            assert self.field is not None
            attname = _attname(self.model, self.field)
            now = instance.__dict__.get(attname, _UNSEEN)
            if now != self.to:
                return False
            if not created and _seen(instance).get(attname, _UNSEEN) == self.to:
                return False  # it held the value already when read: not a change to it
        return self.when is None or self.when(instance)

    def current(self, instance: models.Model, event: "OutboxEvent") -> bool:
        return self.is_current is None or self.is_current(instance, event)

    def name_of_run(self, instance: models.Model, event: "OutboxEvent") -> str:
        return self.run_name(instance, event) if self.run_name else f"{self.name}-{event.run_key}"

    def tags_of_run(self, instance: models.Model, event: "OutboxEvent") -> list[str]:
        return self.tags(instance, event) if self.tags else ["emg", f"trigger-{self.name}"]

    def load(self, object_id: int) -> models.Model | None:
        """The row the event is about, as it is now; None if it was deleted."""
        rows = self.model._default_manager.all()
        if self.select_related:
            rows = rows.select_related(*self.select_related)
        return rows.filter(pk=object_id).first()


def run_idempotency_key(trigger: str, run_key: str) -> str:
    """Prefect's idempotency key of a trigger's run: same trigger and run key, same key, and Prefect
    returns the run it already made. The instance's namespace first: two instances on one Prefect
    server never find each other's runs."""
    return f"{settings.EMG_INSTANCE_NAMESPACE}:{trigger}:{run_key}"


_registry: dict[str, Trigger] = {}


def register(trigger: Trigger) -> Trigger:
    """Add a trigger; from then on saves of its model are watched. Names are unique."""
    known = _registry.get(trigger.name)
    if known is not None and known is not trigger:
        raise ValueError(
            f"two triggers are named {trigger.name!r}: {known.model.__name__} and {trigger.model.__name__}"
        )
    _registry[trigger.name] = trigger
    post_save.connect(on_saved, sender=trigger.model, dispatch_uid=saved_receiver_uid(trigger.model), weak=False)
    if trigger.on == "change":
        uid = f"emg.triggers.init.{trigger.model._meta.label_lower}"
        post_init.connect(_on_init, sender=trigger.model, dispatch_uid=uid, weak=False)
    return trigger


def unregister(name: str) -> None:
    """Forget a trigger (tests); the model's receivers stay and find nothing more for it."""
    _registry.pop(name, None)


def on_create(model: type[models.Model], **declaration: Any) -> Trigger:
    """A trigger that fires when a row of `model` is inserted."""
    return register(Trigger(model=model, on="create", **declaration))


def on_change(model: type[models.Model], *, field: str, to: Any, **declaration: Any) -> Trigger:
    """A trigger that fires when a save leaves `field` holding `to` where it did not before."""
    return register(Trigger(model=model, on="change", field=field, to=to, **declaration))


def on_save(model: type[models.Model], **declaration: Any) -> Trigger:
    """A trigger that considers every save: its run key (and `when`) say whether it is a new run."""
    return register(Trigger(model=model, on="save", **declaration))


def get(name: str) -> Trigger | None:
    return _registry.get(name)


def all_triggers() -> list[Trigger]:
    return list(_registry.values())


def of_model(model: type[models.Model]) -> list[Trigger]:
    return [trigger for trigger in _registry.values() if trigger.model is model]


def import_trigger_modules(names: Iterable[str]) -> None:
    """Import the modules that declare triggers (EMG_TRIGGER_MODULES); each registers its own."""
    for name in names:
        importlib.import_module(name)


def saved(instance: models.Model, *, created: bool = False) -> list["OutboxEvent"]:
    """Record the events of the triggers this save of `instance` fires, in the caller's
    transaction, each published after it commits; the events written (none for run keys that have
    one already). Called on post_save, and by code that changes a row by UPDATE (no signal)."""
    from emg.outbox import publish_after_commit, record

    events = []
    for trigger in of_model(type(instance)):
        if trigger.fires(instance, created):
            event = record(trigger, instance)
            if event is not None:
                publish_after_commit(event)
                events.append(event)
    _remember(instance)
    return events


def saved_receiver_uid(model: type[models.Model]) -> str:
    """The dispatch_uid of the post_save receiver of `model`'s triggers."""
    return f"emg.triggers.saved.{model._meta.label_lower}"


def on_saved(sender, instance: models.Model, created: bool = False, raw: bool = False, **kwargs) -> None:
    """The post_save receiver of every model with a trigger."""
    if raw:  # loading fixtures must not start flows
        return
    saved(instance, created=created)


def _on_init(sender, instance: models.Model, **kwargs) -> None:
    _remember(instance)


def _fields_watched(model: type[models.Model]) -> set[str]:
    return {_attname(model, t.field) for t in of_model(model) if t.field is not None}


def _attname(model: type[models.Model], field: str) -> str:
    """The field's attribute in an instance's __dict__ (`study_id` for a foreign key `study`)."""
    found = model._meta.get_field(field)
    if not isinstance(found, models.Field):
        raise ValueError(f"{model.__name__}.{field} is a relation from another model, not a field of its own")
    return found.attname


def _remember(instance: models.Model) -> None:
    """The watched fields' values as read (or last saved): what a later save is compared with.
    A deferred field is not read for this: it is unknown, and its save counts as a change."""
    watched = _fields_watched(type(instance))
    if watched:
        instance.__dict__["_emg_trigger_seen"] = {
            name: instance.__dict__[name] for name in watched if name in instance.__dict__
        }


def _seen(instance: models.Model) -> dict[str, Any]:
    return instance.__dict__.get("_emg_trigger_seen", {})
