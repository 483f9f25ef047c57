from django.apps import AppConfig


class EmgConfig(AppConfig):
    name = "emg"
    verbose_name = "EMG orchestration"

    def ready(self) -> None:
        from emg import signals  # noqa: F401  (connects the receivers)
