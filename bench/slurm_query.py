"""Batched status query vs one sacct per job, on the cluster `make slurm-up` starts.

Submits N held jobs, times SlurmCluster.query over all of them and a loop of
one query per job over the same jobs, cancels them, and prints one JSON line last.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
import uuid

from harness import emit, log

from slurm_adapter import JobSpec, JobState, SlurmCluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=500, help="number of held jobs (default 500)")
    parser.add_argument("--quick", action="store_true", help="--n 50 (for CI)")
    args = parser.parse_args()
    if args.quick:
        args.n = 50

    cluster = SlurmCluster()
    tag = f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="emg-bench-") as work_dir:
        spec = JobSpec(name="bench", command=("true",), work_dir=work_dir, memory_mb=100, extra_options=("--hold",))
        started = time.perf_counter()
        jobs = [cluster.submit(spec, tag) for _ in range(args.n)]
        submit_s = time.perf_counter() - started
        try:
            # Timed only once slurmdbd has recorded every job, so both ways read the same rows.
            deadline = time.monotonic() + 120
            while JobState.SUBMITTED in {s.state for s in cluster.query(jobs).values()}:
                if time.monotonic() > deadline:
                    raise SystemExit("jobs did not reach accounting within 120s")
                time.sleep(0.5)
            cluster.calls.clear()
            started = time.perf_counter()
            batched = cluster.query(jobs)
            batched_s = time.perf_counter() - started
            slurm_calls = sum(cluster.calls.values())

            started = time.perf_counter()
            per_job = {job.job_id: cluster.query([job])[job.job_id] for job in jobs}
            per_job_s = time.perf_counter() - started
        finally:
            subprocess.run(["scancel", *(j.job_id for j in jobs)], check=True, timeout=120)

    assert len(batched) == args.n, f"batched query returned {len(batched)} of {args.n} jobs"
    assert {s.state for s in batched.values()} == {JobState.PENDING}
    assert {s.state for s in per_job.values()} == {JobState.PENDING}
    log(f"submitted {args.n} held jobs in {submit_s:.2f}s")
    emit(
        "slurm_query",
        n=args.n,
        slurm_calls=slurm_calls,
        batched_s=round(batched_s, 4),
        per_job_s=round(per_job_s, 4),
        ratio=round(per_job_s / batched_s, 1),
    )


if __name__ == "__main__":
    main()
