"""Outbox events of any trigger (emg.triggers): a trigger's name, the row changed (content type
and id), the run key and the run's parameters, where they were an analysis request's generation.

The events already written become the analysis trigger's (flows.triggers), with the run key and
parameters it gives them, so their idempotency keys stay what they were."""

import django.db.models.deletion
from django.db import migrations, models

ANALYSIS_TRIGGER = "analysis-request"  # flows.deployments.ANALYSIS_TRIGGER, as it was when written


def to_generic(apps, schema_editor):
    ContentType = apps.get_model("contenttypes", "ContentType")
    OutboxEvent = apps.get_model("emg", "OutboxEvent")
    if not OutboxEvent.objects.exists():
        return
    request_type, _ = ContentType.objects.get_or_create(app_label="emg", model="analysisrequest")
    for event in OutboxEvent.objects.select_related("request").iterator():
        request = event.request
        event.trigger = ANALYSIS_TRIGGER
        event.content_type_id = request_type.id
        event.object_id = request.id
        event.run_key = f"{request.id}:generation:{event.generation}"
        event.parameters = {"request_id": request.id, "generation": event.generation}
        if event.dispatched_at is not None and request.generation == event.generation:
            event.flow_run_id = request.flow_run_id
        event.save(update_fields=["trigger", "content_type", "object_id", "run_key", "parameters", "flow_run_id"])


def to_requests(apps, schema_editor):
    OutboxEvent = apps.get_model("emg", "OutboxEvent")
    # Only the analysis trigger's events have a request and a generation to go back to.
    OutboxEvent.objects.exclude(trigger=ANALYSIS_TRIGGER).delete()
    for event in OutboxEvent.objects.iterator():
        event.topic = "analysis_request.run"
        event.request_id = event.object_id
        event.generation = event.parameters["generation"]
        event.save(update_fields=["topic", "request", "generation"])


class Migration(migrations.Migration):
    dependencies = [
        ("contenttypes", "0002_remove_content_type_name"),
        ("emg", "0010_wait_history"),
    ]

    operations = [
        migrations.AddField(
            model_name="outboxevent",
            name="trigger",
            field=models.CharField(default="", max_length=100),
            preserve_default=False,
        ),
        migrations.AddField(
            model_name="outboxevent",
            name="content_type",
            field=models.ForeignKey(
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="+",
                to="contenttypes.contenttype",
            ),
        ),
        migrations.AddField(
            model_name="outboxevent",
            name="object_id",
            field=models.PositiveBigIntegerField(null=True),
        ),
        migrations.AddField(
            model_name="outboxevent",
            name="run_key",
            field=models.CharField(default="", max_length=200),
            preserve_default=False,
        ),
        migrations.AddField(
            model_name="outboxevent",
            name="parameters",
            field=models.JSONField(blank=True, default=dict),
        ),
        migrations.AddField(
            model_name="outboxevent",
            name="flow_run_id",
            field=models.UUIDField(blank=True, null=True),
        ),
        # Backwards, the old columns are back (nullable) before the rows are filled in.
        migrations.AlterField(
            model_name="outboxevent",
            name="request",
            field=models.ForeignKey(
                null=True,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="events",
                to="emg.analysisrequest",
            ),
        ),
        migrations.AlterField(
            model_name="outboxevent",
            name="generation",
            field=models.PositiveIntegerField(null=True),
        ),
        migrations.AlterField(
            model_name="outboxevent",
            name="topic",
            field=models.CharField(default="analysis_request.run", max_length=64),
        ),
        migrations.RunPython(to_generic, to_requests),
        migrations.RemoveConstraint(
            model_name="outboxevent",
            name="one_event_per_request_generation",
        ),
        migrations.RemoveField(model_name="outboxevent", name="topic"),
        migrations.RemoveField(model_name="outboxevent", name="request"),
        migrations.RemoveField(model_name="outboxevent", name="generation"),
        migrations.AlterField(
            model_name="outboxevent",
            name="content_type",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.PROTECT, related_name="+", to="contenttypes.contenttype"
            ),
        ),
        migrations.AlterField(
            model_name="outboxevent",
            name="object_id",
            field=models.PositiveBigIntegerField(),
        ),
        migrations.AddConstraint(
            model_name="outboxevent",
            constraint=models.UniqueConstraint(fields=("trigger", "run_key"), name="one_event_per_run_key"),
        ),
        migrations.AddIndex(
            model_name="outboxevent",
            index=models.Index(fields=["content_type", "object_id"], name="outbox_event_object"),
        ),
    ]
