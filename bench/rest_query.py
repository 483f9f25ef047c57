"""One tick's status query of N awaited jobs: Slurm's commands vs slurmrestd, on the cluster `make slurm-up` starts.

Submits N held jobs through slurmrestd, waits until accounting holds them all, then times
SlurmCluster.query and RestCluster.query over all of them (best of 3 each, so that neither pays
for a cold cache alone), counts the commands and requests each made, cancels the jobs, and prints
one JSON line last: ratio is REST time over CLI time.
"""

from __future__ import annotations

import argparse
import getpass
import subprocess
import tempfile
import time
import uuid

from harness import emit, log

from slurm_adapter import JobSpec, JobState, RestCluster, SlurmCluster

SLURMRESTD_URL = "http://127.0.0.1:6820"


def timed_query(cluster, jobs, repeats: int = 3) -> tuple[float, int, dict]:
    best = float("inf")
    for _ in range(repeats):
        cluster.calls.clear()
        started = time.perf_counter()
        result = cluster.query(jobs)
        best = min(best, time.perf_counter() - started)
    return best, sum(cluster.calls.values()), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=500, help="number of held jobs (default 500)")
    parser.add_argument("--quick", action="store_true", help="--n 50 (for CI)")
    args = parser.parse_args()
    if args.quick:
        args.n = 50

    token = subprocess.run(
        ["scontrol", "token", f"username={getpass.getuser()}", "lifespan=3600"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    rest = RestCluster(url=SLURMRESTD_URL, user=getpass.getuser(), token=token)
    cli = SlurmCluster()
    tag = f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="emg-bench-") as work_dir:
        spec = JobSpec(name="bench", command=("true",), work_dir=work_dir, memory_mb=100, extra_options=("--hold",))
        started = time.perf_counter()
        jobs = [rest.submit(spec, tag) for _ in range(args.n)]
        log(f"submitted {args.n} held jobs through slurmrestd in {time.perf_counter() - started:.2f}s")
        try:
            deadline = time.monotonic() + 120
            while JobState.SUBMITTED in {s.state for s in cli.query(jobs).values()}:
                if time.monotonic() > deadline:
                    raise SystemExit("jobs did not reach accounting within 120s")
                time.sleep(0.5)
            cli_s, cli_calls, cli_result = timed_query(cli, jobs)
            rest_s, rest_requests, rest_result = timed_query(rest, jobs)
        finally:
            subprocess.run(["scancel", *(j.job_id for j in jobs)], check=True, timeout=120)

    for name, result in (("cli", cli_result), ("rest", rest_result)):
        assert len(result) == args.n and {s.state for s in result.values()} == {JobState.PENDING}, name
    emit(
        "rest_query",
        n=args.n,
        api_version=rest.version,
        cli_commands_per_tick=cli_calls,
        rest_requests_per_tick=rest_requests,
        cli_s=round(cli_s, 4),
        rest_s=round(rest_s, 4),
        ratio=round(rest_s / cli_s, 2),
    )


if __name__ == "__main__":
    main()
