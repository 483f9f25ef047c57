"""From a cluster job's end to its flow run's resume, against the reconciler's tick interval.

For each tick interval T: --n real Slurm jobs are declared (each waits for a "go" file, then
sleeps a staggered fraction of a spread of max(10 s, 4 T), writes the time, and exits), each
awaited by a real flow run of a deployment no runner serves, which is then suspended as
`wait_for_jobs` suspends it. The real `Reconciler` ticks every T seconds (fixed rate, as beat
schedules it) from a thread, with EMG_RESUMES_PER_TICK resumes per tick. Latency per job: from
the time the job wrote as it ended to the timestamp Prefect gave the resumed run's state.

Ends are staggered so they fall at every phase of the tick; the expected latency is then about
T/2 plus what Slurm and one tick take, and the worst about T plus that.

    .venv/bin/python bench/resume_latency.py [--ticks 1,5] [--n 50] [--quick]
"""

from __future__ import annotations

import argparse
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from harness import SESSION, BenchServices, configure_environment, emit, log, percentile

TICKS = (1.0, 5.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ticks", default=",".join(f"{t:g}" for t in TICKS), help="tick intervals in seconds")
    parser.add_argument("--n", type=int, default=50, help="jobs (and suspended flow runs) per interval (default 50)")
    parser.add_argument("--quick", action="store_true", help="--n 10 (for CI)")
    args = parser.parse_args()
    if args.quick:
        args.n = 10
    intervals = [float(t) for t in args.ticks.split(",")]

    configure_environment()
    with BenchServices("resume_latency") as services:
        services.slurm_cleanup()
        services.prefect_server()
        services.django_database()
        by_tick = [measure(interval, args.n) for interval in intervals]
    emit("resume_latency", n=args.n, by_tick=by_tick)


class Ticker(threading.Thread):
    """Calls `tick()` every `interval` seconds from a fixed start (a late tick does not shift the next)."""

    def __init__(self, tick, interval: float):
        super().__init__(daemon=True)
        self.tick = tick
        self.interval = interval
        self.stopped = threading.Event()
        self.errors: list[str] = []
        self.durations: list[float] = []

    def run(self) -> None:
        from django.db import connections

        origin = time.monotonic()
        count = 0
        try:
            while not self.stopped.is_set():
                started = time.monotonic()
                report = self.tick()
                self.durations.append(time.monotonic() - started)
                self.errors += report.errors
                count += 1
                self.stopped.wait(max(0.0, origin + count * self.interval - time.monotonic()))
        finally:
            connections.close_all()

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=120)


def measure(interval: float, n: int) -> dict:
    from django.conf import settings
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Running, Suspended

    from devstack.processes import wait_until
    from emg.models import ClusterJob, ClusterJobState, JobWait
    from flows.cluster_jobs import declare_job
    from slurm_adapter import JobSpec, SlurmCluster
    from workers.reconciler import Reconciler

    @flow(name="emg-bench-awaiting-flow")
    def awaiting_flow() -> None:
        """Never run: it only names the flow runs."""

    work_dir = Path(settings.EMG_WORK_DIR) / f"tick-{interval:g}"
    work_dir.mkdir(parents=True)
    go = work_dir / "go"
    spread = max(10.0, 4 * interval)
    ended_files = [work_dir / f"ended-{index}" for index in range(n)]
    specs = [
        JobSpec(
            name=f"bench-resume-{SESSION}-{index}",
            work_dir=str(work_dir),
            memory_mb=20,
            time_limit_minutes=10,
            partition=settings.EMG_SLURM_PARTITION,
            command=(
                "bash",
                "-c",
                (f"while [ ! -e {go} ]; do sleep 0.1; done; sleep {index * spread / n:.3f}; date +%s.%N > {ended}"),
            ),
        )
        for index, ended in enumerate(ended_files)
    ]
    cluster = SlurmCluster(accounting_grace_s=settings.EMG_SLURM_ACCOUNTING_GRACE_SECONDS)
    with get_client(sync_client=True) as prefect:
        reconciler = Reconciler(
            cluster,
            prefect,
            max_active_jobs=1000,
            max_submissions_per_minute=1000,
            resumes_per_tick=settings.EMG_RESUMES_PER_TICK,
            zombie_after=timedelta(hours=1),
            max_flow_reruns=3,
        )
        deployment_id = prefect.create_deployment(flow_id=prefect.create_flow(awaiting_flow), name="unserved")
        jobs = [declare_job(spec) for spec in specs]
        runs = [prefect.create_flow_run_from_deployment(deployment_id).id for _ in jobs]
        for run, job in zip(runs, jobs, strict=True):
            prefect.set_flow_run_state(run, Running(), force=True)
            JobWait.objects.create(flow_run_id=run, step="bench", job=job)

        def all_submitted() -> bool:
            report = reconciler.tick()
            assert not report.errors, report.errors
            unsettled = [ClusterJobState.DECLARED, ClusterJobState.SUBMITTED]
            return not ClusterJob.objects.filter(state__in=unsettled).exists()

        wait_until(all_submitted, timeout=180, interval=0.5, message=f"all {n} jobs submitted and in accounting")
        for run, job in zip(runs, jobs, strict=True):
            prefect.set_flow_run_state(
                run, Suspended(timeout_seconds=3600, pause_key=f"jobs-{job.id}-n1-wait-1"), force=True
            )

        ticker = Ticker(reconciler.tick, interval)
        ticker.start()
        try:
            go.touch()
            wait_until(
                lambda: not JobWait.objects.filter(released_at__isnull=True).exists(),
                timeout=spread + 20 * interval + 120,
                interval=0.5,
                message="every flow run resumed",
            )
        finally:
            ticker.stop()
        assert not ticker.errors, ticker.errors

        resumed_at = {}
        for run in runs:
            state = prefect.read_flow_run(run).state
            assert state.type == StateType.SCHEDULED, state
            resumed_at[run] = state.timestamp
    ended_at = [datetime.fromtimestamp(float(path.read_text()), tz=UTC) for path in ended_files]
    latencies = [(resumed_at[run] - ended).total_seconds() for run, ended in zip(runs, ended_at, strict=True)]
    JobWait.objects.all().delete()
    result = {
        "tick_s": interval,
        "n": n,
        "latency_s_p50": round(percentile(latencies, 50), 3),
        "latency_s_p99": round(percentile(latencies, 99), 3),
        "latency_s_max": round(max(latencies), 3),
        "p50_over_tick": round(percentile(latencies, 50) / interval, 2),
        "tick_duration_s_p50": round(percentile(ticker.durations, 50), 3),
    }
    log(str(result))
    return result


if __name__ == "__main__":
    main()
