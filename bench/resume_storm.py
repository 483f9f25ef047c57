"""A resume storm: N suspended flow runs whose jobs all ended at once, resumed by the reconciler's
adaptive pace, against the fixed cap of 20 a tick it replaced.

N real flow runs of a deployment no runner serves are made on this run's own Prefect server
(PostgreSQL) and suspended as `wait_for_jobs` suspends them; each waits (a JobWait row) for a
cluster job already COMPLETED (Slurm is asked nothing of them: what is measured is the tick and Prefect).
Ticks then run back to back until every wait is released, and the time to the last resume at the
beat's interval is what those ticks would take on a beat: the sum over ticks of the longer of the
interval and the tick itself. The fixed cap runs over its own N runs for --baseline-ticks ticks
only (at 20 a tick it would take N/20 of them), and its time is extrapolated from their mean;
the output says so. No resume may fail and no run may end in any state but Scheduled.

    .venv/bin/python bench/resume_storm.py [--n 5000] [--interval 10] [--quick]
"""

from __future__ import annotations

import argparse
import math
import time
from concurrent.futures import ThreadPoolExecutor

from harness import BenchServices, configure_environment, emit, log

FIXED_CAP = 20
CREATE_THREADS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000, help="suspended flow runs (default 5000)")
    parser.add_argument("--interval", type=float, default=10.0, help="the beat's tick interval in seconds (10)")
    parser.add_argument("--baseline-ticks", type=int, default=5, help="ticks the fixed cap is measured over (5)")
    parser.add_argument("--quick", action="store_true", help="--n 100 (for CI)")
    args = parser.parse_args()
    if args.quick:
        args.n = 100

    configure_environment()
    with BenchServices("resume_storm") as services:
        services.prefect_server()
        services.django_database()
        figures = measure(args.n, args.interval, args.baseline_ticks)
    emit("resume_storm", n=args.n, interval_s=args.interval, **figures)


def measure(n: int, interval: float, baseline_ticks: int) -> dict:
    from datetime import timedelta

    from django.conf import settings
    from django.db import connections
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Suspended

    from emg.models import ClusterJob, ClusterJobState, JobWait
    from slurm_adapter import SlurmCluster
    from workers.reconcile.resume_pace import ResumePace
    from workers.reconciler import Reconciler

    @flow(name="emg-bench-storm-flow")
    def storm_flow() -> None:
        """Never run: it only names the flow runs."""

    def storm(prefect, deployment_id, count: int) -> list:
        """`count` suspended runs, each waiting for a job that has ended."""

        def suspended_run(_index: int):
            with get_client(sync_client=True) as client:
                run_id = client.create_flow_run_from_deployment(deployment_id).id
                client.set_flow_run_state(run_id, Suspended(timeout_seconds=86400, pause_key="jobs-wait-1"), force=True)
            return run_id

        started = time.perf_counter()
        with ThreadPoolExecutor(CREATE_THREADS) as pool:
            runs = list(pool.map(suspended_run, range(count)))
        connections.close_all()
        jobs = ClusterJob.objects.bulk_create(
            [
                ClusterJob(
                    name="storm",
                    fingerprint=f"storm-{run}",
                    spec={},
                    state=ClusterJobState.COMPLETED,
                    slurm_job_id=str(700000 + index),
                    attempts=1,
                )
                for index, run in enumerate(runs)
            ],
            batch_size=1000,
        )
        JobWait.objects.bulk_create(
            [JobWait(flow_run_id=run, step="storm", job=job) for run, job in zip(runs, jobs, strict=True)],
            batch_size=1000,
        )
        log(f"{count} suspended flow runs waiting on ended jobs in {time.perf_counter() - started:.0f}s")
        return runs

    def tick_until_released(reconciler, max_ticks: int | None = None) -> tuple[list[float], list[int]]:
        durations, resumed = [], []
        while JobWait.objects.filter(released_at__isnull=True).exists():
            if max_ticks is not None and len(durations) >= max_ticks:
                break
            started = time.perf_counter()
            report = reconciler.tick()
            durations.append(time.perf_counter() - started)
            resumed.append(len(report.resumed))
            assert not report.errors, report.errors
        return durations, resumed

    def at_the_beat(durations: list[float]) -> float:
        return sum(max(interval, duration) for duration in durations)

    with get_client(sync_client=True) as prefect:
        deployment_id = prefect.create_deployment(flow_id=prefect.create_flow(storm_flow), name="unserved")
        cluster = SlurmCluster()  # asked nothing about these jobs (they have ended), only the tick's routine checks
        limits = dict(
            max_active_jobs=1000, max_submissions_per_minute=1000, zombie_after=timedelta(hours=1), max_flow_reruns=3
        )

        runs = storm(prefect, deployment_id, n)
        pace = ResumePace(
            settings.EMG_RESUMES_PER_TICK,
            ceiling=settings.EMG_RESUMES_PER_TICK_MAX,
            concurrency=settings.EMG_RESUME_CONCURRENCY,
            target_seconds=interval,
        )
        adaptive = Reconciler(cluster, prefect, resumes_per_tick=FIXED_CAP, resume_pace=pace, **limits)
        started = time.perf_counter()
        adaptive_durations, adaptive_resumed = tick_until_released(adaptive)
        adaptive_s = time.perf_counter() - started
        assert sum(adaptive_resumed) == n, sum(adaptive_resumed)
        states = {prefect.read_flow_run(run).state.type for run in runs[:: max(1, n // 200)]}
        assert states == {StateType.SCHEDULED}, states
        log(f"adaptive: {len(adaptive_durations)} ticks, resumed per tick {adaptive_resumed}")

        JobWait.objects.all().delete()
        ClusterJob.objects.all().delete()
        storm(prefect, deployment_id, n)
        fixed = Reconciler(cluster, prefect, resumes_per_tick=FIXED_CAP, **limits)
        fixed_durations, fixed_resumed = tick_until_released(fixed, max_ticks=baseline_ticks)
        assert all(count == min(FIXED_CAP, n) for count in fixed_resumed[:-1]), fixed_resumed
        fixed_ticks = math.ceil(n / FIXED_CAP)
        mean_tick = sum(fixed_durations) / len(fixed_durations)
        fixed_at_beat = fixed_ticks * max(interval, mean_tick)

    adaptive_at_beat = at_the_beat(adaptive_durations)
    return {
        "adaptive_ticks": len(adaptive_durations),
        "adaptive_resumed_per_tick": adaptive_resumed,
        "adaptive_ticks_s": round(adaptive_s, 2),
        "adaptive_tick_s_max": round(max(adaptive_durations), 2),
        "adaptive_to_last_resume_at_beat_s": round(adaptive_at_beat, 1),
        "fixed_cap": FIXED_CAP,
        "fixed_ticks": fixed_ticks,
        "fixed_ticks_measured": len(fixed_durations),
        "fixed_tick_s_mean": round(mean_tick, 3),
        "fixed_to_last_resume_at_beat_s": round(fixed_at_beat, 1),
        "speedup_ratio": round(fixed_at_beat / adaptive_at_beat, 1),
    }


if __name__ == "__main__":
    main()
