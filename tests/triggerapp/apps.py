from django.apps import AppConfig


class TriggerAppConfig(AppConfig):
    """A product of its own, known only to the test settings: a model, a flow and its triggers,
    with nothing of them in emg or workers."""

    name = "tests.triggerapp"
    label = "triggerapp"
    default_auto_field = "django.db.models.BigAutoField"
