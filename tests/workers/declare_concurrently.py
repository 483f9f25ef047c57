"""`python -m tests.workers.declare_concurrently SPEC_JSON N`: N forked processes declare one job at once.

They meet at a barrier first, so the declarations really race; each child opens its own
database connection (the parent never opens one). Prints the job ids they got, as JSON.
"""

import json
import multiprocessing
import os
import sys

import django


def main() -> None:
    spec_json, count = sys.argv[1], int(sys.argv[2])
    django.setup()
    from flows.cluster_jobs import declare_job
    from slurm_adapter import JobSpec

    spec = JobSpec.from_dict(json.loads(spec_json))
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(count)
    results = context.Queue()

    def declare() -> None:
        barrier.wait(timeout=120)
        results.put((os.getpid(), declare_job(spec).id))

    children = [context.Process(target=declare) for _ in range(count)]
    for child in children:
        child.start()
    answers = [results.get(timeout=180) for _ in children]
    for child in children:
        child.join(timeout=30)
    if any(child.exitcode != 0 for child in children):
        sys.exit(f"child exit codes: {[child.exitcode for child in children]}")
    print(json.dumps({"pids": [pid for pid, _ in answers], "job_ids": [job_id for _, job_id in answers]}))


if __name__ == "__main__":
    main()
