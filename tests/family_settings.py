"""The settings of the runner that serves the test parent flow (tests/e2e/family_flows.py) and
nothing else: no trigger's deployment (the session stack's runner serves those), only the one
EMG_SERVED_DEPLOYMENTS names. tests/family_children_settings.py serves the child, on a runner of
its own: a test may kill the parent's runner and leave the children's running."""

from tests.product_settings import *  # noqa: F403

EMG_TRIGGER_MODULES: list[str] = []
EMG_SERVED_DEPLOYMENTS = {"emg-test-parent/served": "tests.e2e.family_flows.parent"}
