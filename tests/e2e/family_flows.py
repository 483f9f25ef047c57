"""A parent flow that starts child flows through flows.child_flows, and its child: served by
`python -m flows.serve` on tests/family_settings.py (EMG_SERVED_DEPLOYMENTS names both, and no
trigger), started by tests/e2e/test_child_flows.py beside the session stack.

A child in mode "job" runs one tiny cluster step that waits for a "go" file (so the test decides
when the children may end), "quick" returns at once, "crash-once" kills its own process (SIGKILL,
as the kernel's OOM killer would) the first time and returns at once when re-run. Each child returns
(and persists) what it did. The parent appends what it got back to a journal (one JSON object a line), or the failure.
"""

import json
import os
import shlex
import signal
from pathlib import Path

from flows.django_setup import setup_django

setup_django()

from prefect import flow  # noqa: E402

from flows.child_flows import ChildFlowFailed, run_child_flows  # noqa: E402
from flows.cluster_jobs import JOB_DIR, RESULTS  # noqa: E402
from flows.steps import ClusterStep, run_cluster_job  # noqa: E402
from slurm_adapter import JobSpec  # noqa: E402

PARENT_FLOW = "emg-test-parent"
CHILD_FLOW = "emg-test-child"
PARENT_DEPLOYMENT = f"{PARENT_FLOW}/served"
CHILD_DEPLOYMENT = f"{CHILD_FLOW}/served"
OUTPUT = "n.txt"


def job_name(tag: str, index: int) -> str:
    return f"emg-test-child-{tag}-{index}"


def step(tag: str, index: int, go: str) -> ClusterStep:
    work = f"while [ ! -e {shlex.quote(go)} ]; do sleep 0.2; done\n"
    work += f"mkdir -p {JOB_DIR}/{RESULTS}\necho {index} > {JOB_DIR}/{RESULTS}/{OUTPUT}\n"
    spec = JobSpec(
        name=job_name(tag, index), command=("bash", "-c", work), work_dir=JOB_DIR, time_limit_minutes=10, memory_mb=64
    )
    return ClusterStep("echo", spec, outputs=[OUTPUT])


@flow(name=CHILD_FLOW, persist_result=True)
def child(tag: str, index: int, mode: str, go: str) -> dict:
    if mode == "fail":
        raise RuntimeError(f"child {index} of {tag} was told to fail")
    if mode == "crash-once":
        crashed = Path(f"{go}-crashed-{index}")
        if not crashed.exists():
            crashed.touch()
            os.kill(os.getpid(), signal.SIGKILL)
    if mode == "job":
        job = run_cluster_job(step(tag, index, go))
        return {"index": index, "output": (Path(job.output_dir) / OUTPUT).read_text().strip()}
    return {"index": index, "output": "quick"}


def append(journal: str, entry: dict) -> None:
    with open(journal, "a") as file:
        file.write(json.dumps(entry) + "\n")


@flow(name=PARENT_FLOW)
def parent(
    tag: str,
    count: int,
    mode: str,
    go: str,
    journal: str,
    failing: list[int] | None = None,
    crashing: list[int] | None = None,
) -> str:
    modes = [
        "fail" if index in (failing or []) else "crash-once" if index in (crashing or []) else mode
        for index in range(count)
    ]
    parameters = [{"tag": tag, "index": index, "mode": modes[index], "go": go} for index in range(count)]
    append(journal, {"started": count})
    try:
        results = run_child_flows(CHILD_DEPLOYMENT, parameters, keys=[f"child[{index}]" for index in range(count)])
    except ChildFlowFailed as failure:
        append(journal, {"failed": failure.keys, "message": str(failure)})
        return "failed"
    append(journal, {"done": [[r.key, str(r.flow_run_id), r.state, r.result] for r in results]})
    return "done"
