from django.apps import AppConfig
from django.conf import settings


class EmgConfig(AppConfig):
    name = "emg"
    verbose_name = "EMG orchestration"

    def ready(self) -> None:
        from emg import triggers

        # By name, from the settings: the flows' packages declare their triggers, and emg imports
        # none of them itself (.importlinter).
        triggers.import_trigger_modules(settings.EMG_TRIGGER_MODULES)
