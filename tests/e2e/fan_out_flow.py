"""A flow fanning out small cluster jobs through flows.steps, and a runner serving it:
`python -m tests.e2e.fan_out_flow` (started by tests/e2e/test_cluster_steps.py beside the session stack).

Each job waits for a "go" file before it does its work, so the test decides when the jobs may end
(after the flow run has suspended on them) and nothing depends on how fast Slurm runs them. The flow
appends what it saw to a journal (one JSON object a line): the jobs it was about to wait for, then
the results it got back, or the failure it was given. A run from the top appends again.
"""

import asyncio
import json
import shlex
from pathlib import Path
from typing import cast

from flows.django_setup import setup_django

setup_django()

from prefect import flow  # noqa: E402
from prefect.deployments.runner import RunnerDeployment  # noqa: E402
from prefect.runner import Runner  # noqa: E402

from emg.models import ClusterJob  # noqa: E402
from emg.policies import ResubmitPolicy  # noqa: E402
from flows.cluster_jobs import JOB_DIR, RESULTS  # noqa: E402
from flows.steps import ClusterStep, ClusterStepFailed, run_cluster_jobs  # noqa: E402
from slurm_adapter import JobSpec  # noqa: E402

FAN_OUT_FLOW = "emg-test-fan-out"
FAN_OUT_DEPLOYMENT = f"{FAN_OUT_FLOW}/served"
OUTPUT = "n.txt"


# Memory a hungry job needs: more than every job's first 64 MB, less than the 512 MB of its retry.
HUNGRY_MB = 200


def step(tag: str, index: int, go: str, fails: bool, hungry: bool = False) -> ClusterStep:
    work = f"while [ ! -e {shlex.quote(go)} ]; do sleep 0.2; done\n"
    if hungry:  # the node's cgroups enforce --mem: a real OUT_OF_MEMORY on the first attempt
        work += f"python3 -c 'a = bytearray({HUNGRY_MB} * 1024 * 1024); import time; time.sleep(1)'\n"
    if fails:
        work += f"echo 'job {index} of {tag}: record 600 is truncated' >&2\nexit 7\n"
    else:
        work += f"mkdir -p {JOB_DIR}/{RESULTS}\necho {index} > {JOB_DIR}/{RESULTS}/{OUTPUT}\n"
    spec = JobSpec(
        name=f"emg-test-fan-out-{tag}-{index}",
        command=("bash", "-c", work),
        work_dir=JOB_DIR,
        time_limit_minutes=10,
        memory_mb=64,
    )
    return ClusterStep(f"echo[{index}]", spec, policy=ResubmitPolicy(memory_factor=8), outputs=[OUTPUT])


def append(journal: str, entry: dict) -> None:
    with open(journal, "a") as file:
        file.write(json.dumps(entry) + "\n")


def result(job: ClusterJob) -> list:
    return [job.id, job.state, (Path(job.output_dir) / OUTPUT).read_text().strip()]


@flow(name=FAN_OUT_FLOW)
def fan_out(tag: str, count: int, failing: list[int], go: str, journal: str, hungry: list[int] | None = None) -> str:
    steps = [step(tag, index, go, index in failing, index in (hungry or [])) for index in range(count)]

    def waiting(pending: dict[str, ClusterJob]) -> None:
        append(journal, {"waiting": {name: job.id for name, job in pending.items()}})

    try:
        jobs = run_cluster_jobs(steps, on_wait=waiting)
    except ClusterStepFailed as failure:
        append(journal, {"failed": failure.steps, "message": str(failure)})
        return "failed"
    append(journal, {"done": [[each.name, *result(job)] for each, job in zip(steps, jobs, strict=True)]})
    return "done"


def main() -> None:
    runner = Runner(limit=4)
    runner.add_deployment(cast(RunnerDeployment, fan_out.to_deployment(name="served")))
    asyncio.run(runner.start())


if __name__ == "__main__":
    main()
