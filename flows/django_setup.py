import os

import django


def setup_django() -> None:
    """Flow runs start in fresh processes; each needs Django's app registry once."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "emg.settings")
    django.setup()
