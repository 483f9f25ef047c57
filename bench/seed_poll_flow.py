"""The seed system's way to wait for a cluster job, as a baseline: a live flow process that polls.

`python bench/seed_poll_flow.py --limit K` serves the deployment `seed-poll-wait/baseline` with a
Prefect runner that runs up to K flow runs at once; each run polls its Slurm job's state every
`poll_seconds` until the job ends, holding its process the whole time.

It imports Prefect and the Slurm adapter only (the seed's flows imported Django as well), so it
understates the seed's cost per waiting pipeline rather than overstating it.
"""

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow, serve  # noqa: E402

from slurm_adapter import SlurmCluster, SubmittedJob  # noqa: E402

FLOW_NAME = "seed-poll-wait"
DEPLOYMENT_NAME = "baseline"
DEPLOYMENT = f"{FLOW_NAME}/{DEPLOYMENT_NAME}"


@flow(name=FLOW_NAME)
def poll_until_ended(job_id: str, submit_time: str, poll_seconds: float = 10) -> str:
    cluster = SlurmCluster()
    job = SubmittedJob(job_id, datetime.fromisoformat(submit_time), "")
    while True:
        status = cluster.query([job])[job_id]
        if status.state.is_final:
            return status.state.value
        time.sleep(poll_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, required=True, help="flow runs the runner runs at once")
    args = parser.parse_args()
    serve(poll_until_ended.to_deployment(name=DEPLOYMENT_NAME), limit=args.limit)


if __name__ == "__main__":
    main()
