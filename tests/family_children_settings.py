"""The settings of the runner that serves the test child flow (tests/e2e/family_flows.py) only."""

from tests.family_settings import *  # noqa: F403

EMG_SERVED_DEPLOYMENTS = {"emg-test-child/served": "tests.e2e.family_flows.child"}
