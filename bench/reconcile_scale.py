"""Slurm calls, SQL statements and seconds of one reconciler tick over N awaited jobs, vs one
query per job (Slurm) and one UPDATE per changed job (the database).

Submits max(N) real held Slurm jobs (cheap: they never run) once, waits until accounting has
them all, then for each N: puts exactly N of them in a fresh database as SUBMITTED ClusterJob
rows with their Slurm ids, runs one `Reconciler.tick()` (its refresh step sees all N change
to PENDING and records each), then a second tick (nothing changes: the steady state), and then
the baseline over the same N jobs: a loop of one `cluster.query([job])` per job. Slurm calls
come from `SlurmCluster.calls`, SQL statements from Django's query capture. The database half
of the first tick (recording N changes) is timed again on its own both ways: all N in one
statement (emg.jobs.record_statuses, what the tick does) and the per-row loop of
emg.jobs.record_status that ticks used before. No flow waits, so the tick's flow-run step asks
Prefect nothing (no Prefect server is needed). Every held job is cancelled at the end.

    .venv/bin/python bench/reconcile_scale.py [--sizes 1,100,1000,5000] [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from harness import SESSION, BenchServices, configure_environment, emit, log

SIZES = (1, 1000, 10000)
QUICK_SIZES = (1, 100)
SUBMIT_THREADS = 4
LOOP_SAMPLE = 500


def max_job_count() -> int | None:
    output = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    for line in output.splitlines():
        if line.startswith("MaxJobCount"):
            return int(line.split("=", 1)[1].strip())
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="numbers of awaited jobs")
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} (for CI)")
    # Sizes above half of Slurm's MaxJobCount (20,000 in slurm/slurm.conf.in) are refused.
    args = parser.parse_args()
    sizes = sorted(set(QUICK_SIZES if args.quick else map(int, args.sizes.split(","))))

    configure_environment()
    with BenchServices("reconcile_scale") as services:
        services.slurm_cleanup()
        services.django_database()
        by_n = measure(sizes)
    emit("reconcile_scale", sizes=sizes, by_n=by_n)


def measure(sizes: list[int]) -> list[dict]:
    from django.conf import settings
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from emg import jobs as job_store
    from emg.models import ClusterJob, ClusterJobState
    from slurm_adapter import JobSpec, JobState, SlurmCluster
    from workers.reconciler import Reconciler

    limit = max_job_count()
    if limit is not None and max(sizes) > limit // 2:
        raise SystemExit(f"{max(sizes)} held jobs would fill half of Slurm's MaxJobCount={limit}")

    work_dir = Path(settings.EMG_WORK_DIR) / "held"
    spec = JobSpec(
        name="bench-held",
        command=("true",),
        work_dir=str(work_dir),
        memory_mb=10,
        time_limit_minutes=1,
        partition=settings.EMG_SLURM_PARTITION,
        extra_options=("--hold",),
    )
    submitter = SlurmCluster()
    started = time.perf_counter()
    with ThreadPoolExecutor(SUBMIT_THREADS) as pool:
        jobs = list(pool.map(lambda n: submitter.submit(spec, f"bench-{SESSION}-{n}"), range(max(sizes))))
    log(f"submitted {len(jobs)} held jobs in {time.perf_counter() - started:.1f}s")

    cluster = SlurmCluster(accounting_grace_s=settings.EMG_SLURM_ACCOUNTING_GRACE_SECONDS)
    # Timed only once slurmdbd has recorded every job, so the tick and the loop read the same rows.
    deadline = time.monotonic() + 300
    while JobState.SUBMITTED in {status.state for status in cluster.query(jobs).values()}:
        if time.monotonic() > deadline:
            raise SystemExit("the held jobs did not all reach Slurm accounting within 300s")
        time.sleep(1)

    reconciler = Reconciler(
        cluster,
        None,
        max_active_jobs=100,
        max_submissions_per_minute=1000,
        resumes_per_tick=20,
        zombie_after=timedelta(hours=1),
        max_flow_reruns=3,
    )
    results = []

    def fresh_rows(awaited) -> None:
        ClusterJob.objects.all().delete()
        ClusterJob.objects.bulk_create(
            [
                ClusterJob(
                    name=spec.name,
                    fingerprint=f"bench-{SESSION}-{index}",
                    spec=spec.to_dict(),
                    state=ClusterJobState.SUBMITTED,
                    slurm_job_id=job.job_id,
                    submit_time=job.submit_time,
                    log_path=job.log_path,
                    attempts=1,
                    state_checked_at=timezone.now(),
                )
                for index, job in enumerate(awaited)
            ],
            batch_size=1000,
        )

    def time_recording(record, statuses) -> tuple[float, int]:
        """Seconds and SQL statements to record every row's new status, from rows as the tick reads them."""
        changes = [(job, statuses[job.slurm_job_id]) for job in ClusterJob.objects.awaited()]
        with CaptureQueriesContext(connection) as queries:
            started = time.perf_counter()
            record(changes)
            seconds = time.perf_counter() - started
        assert ClusterJob.objects.filter(state=ClusterJobState.PENDING).count() == len(changes)
        return seconds, len(queries)

    for n in sizes:
        awaited = jobs[:n]
        fresh_rows(awaited)

        ticks = []
        for _ in range(2):
            cluster.calls.clear()
            with CaptureQueriesContext(connection) as queries:
                started = time.perf_counter()
                report = reconciler.tick()
                seconds = time.perf_counter() - started
            ticks.append((seconds, sum(cluster.calls.values()), len(queries), report))
        (tick_s, tick_calls, tick_sql, first), (steady_s, steady_calls, steady_sql, second) = ticks
        assert not first.errors and not second.errors, first.errors + second.errors
        assert first.checked == n and len(first.changed) == n, (first.checked, len(first.changed))
        assert set(first.changed.values()) == {JobState.PENDING.value}, set(first.changed.values())
        assert second.checked == n and not second.changed

        cluster.calls.clear()
        started = time.perf_counter()
        # One query per job takes ~0.1 s: above LOOP_SAMPLE jobs the loop runs over a sample and its
        # time and calls are scaled up to N (said in the output).
        sample = awaited[:LOOP_SAMPLE]
        looped = {job.job_id: cluster.query([job])[job.job_id] for job in sample}
        loop_s = (time.perf_counter() - started) * n / len(sample)
        loop_calls = sum(cluster.calls.values()) * n // len(sample)
        assert {status.state for status in looped.values()} == {JobState.PENDING}
        looped = cluster.query(awaited)  # every job's status, for the recording comparison

        fresh_rows(awaited)
        bulk_s, bulk_sql = time_recording(job_store.record_statuses, looped)
        fresh_rows(awaited)
        per_row_s, per_row_sql = time_recording(
            lambda changes: [job_store.record_status(job, status) for job, status in changes], looped
        )

        result = {
            "n": n,
            "tick_slurm_calls": tick_calls,
            "tick_sql": tick_sql,
            "tick_s": round(tick_s, 4),
            "steady_tick_slurm_calls": steady_calls,
            "steady_tick_sql": steady_sql,
            "steady_tick_s": round(steady_s, 4),
            "record_changes_sql": bulk_sql,
            "record_changes_s": round(bulk_s, 4),
            "per_row_record_sql": per_row_sql,
            "per_row_record_s": round(per_row_s, 4),
            "record_seconds_ratio": round(per_row_s / bulk_s, 1),
            "loop_sampled_jobs": len(sample),
            "loop_slurm_calls": loop_calls,
            "loop_s": round(loop_s, 4),
            "calls_ratio": round(loop_calls / tick_calls, 1),
            "seconds_ratio": round(loop_s / tick_s, 1),
            "steady_seconds_ratio": round(loop_s / steady_s, 1),
        }
        log(str(result))
        results.append(result)
    return results


if __name__ == "__main__":
    main()
