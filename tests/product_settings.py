"""The product's settings and a product of the tests' own, with a model, a flow and a trigger and
nothing of them in emg or workers (tests.triggerapp, tests/test_triggers.py).

The settings of the session stack's processes (tests/conftest.py), and under the test session's
(tests/settings.py), which add its environment's defaults.
"""

from emg.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "tests.triggerapp"]  # noqa: F405
EMG_TRIGGER_MODULES = [*EMG_TRIGGER_MODULES, "tests.triggerapp.triggers"]  # noqa: F405
