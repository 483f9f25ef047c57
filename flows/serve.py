"""The Prefect runner for our deployments: `python -m flows.serve`.

It polls the Prefect API for scheduled and resumed runs of these deployments and runs
each in a fresh subprocess, so a suspended flow holds no process at all.
"""

import os
from typing import cast

from django.conf import settings
from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from flows.analysis import analyse_study
from flows.deployments import ANALYSIS_DEPLOYMENT_NAME


def main() -> None:
    # Flow-run subprocesses inherit this: their heartbeats tell a live run from a zombie.
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(settings.EMG_FLOW_HEARTBEAT_SECONDS))
    # Called from sync code, to_deployment returns the deployment itself (not a coroutine).
    serve(cast(RunnerDeployment, analyse_study.to_deployment(name=ANALYSIS_DEPLOYMENT_NAME)))


if __name__ == "__main__":
    main()
