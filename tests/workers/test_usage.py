"""What an ended job used, read from Slurm's accounting by the reconciler, once."""

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from emg.efficiency import efficiency
from emg.models import ClusterJob
from tests.workers.ticking import run_job, shell_job, tick_until
from workers.reconcile.usage import UNAVAILABLE, USAGE_SETTLE

pytestmark = [pytest.mark.slurm, pytest.mark.django_db(transaction=True)]

# A fixed amount of work on one CPU (about two seconds of it on an idle core) with about 60 MB held,
# then a second at rest: one thread of the two CPUs asked for, so under half of them.
BUSY = (
    "python3 -c \"import time; block = bytearray(60 * 1024 * 1024); block[::4096] = b'x' * len(block[::4096]); "
    '[sum(range(10_000_000)) for _ in range(6)]; time.sleep(1)"'
)


def test_an_ended_jobs_cpu_memory_and_wall_time_are_recorded_against_what_it_asked(make_reconciler, work_dir):
    reconciler = make_reconciler()
    job = run_job(reconciler, shell_job("usage-busy", BUSY, work_dir, memory_mb=200, cpus=2, time_limit_minutes=5))
    assert job.state == "COMPLETED", job.history

    tick_until(
        reconciler,
        lambda: ClusterJob.objects.get(id=job.id).usage is not None,
        timeout=120,
        message="the job's usage was read from accounting",
    )
    job.refresh_from_db()
    usage = job.usage
    assert usage["cpus"] == 2 and usage["requested_memory_mb"] == 200 and usage["time_limit_s"] == 300
    # Some CPU time, and no more than two CPUs' worth: how much of the loop's second a loaded
    # machine gave it varies (0.3 s was seen beside a full test suite).
    assert usage["elapsed_s"] >= 1 and 0 < usage["cpu_s"] <= usage["elapsed_s"] * 2
    assert 50 <= usage["max_rss_mb"] <= 200  # the batch step's peak: the 60 MB it held
    found = efficiency(usage)
    assert found is not None and found.cpu is not None and found.cpu < 0.5  # one of two CPUs, part of the time
    assert "CPU" in found.flags and "time" in found.flags  # seconds of a five-minute limit

    # Recorded once: a later tick neither asks again nor changes it.
    calls_before = reconciler.cluster.calls["sacct"]
    reconciler.tick()
    job.refresh_from_db()
    assert job.usage == usage
    assert reconciler.cluster.calls["sacct"] == calls_before  # nothing awaited, nothing without usage


def test_a_job_accounting_has_no_record_of_is_recorded_unavailable_and_not_asked_about_again(make_reconciler):
    reconciler = make_reconciler()
    ended = timezone.now() - USAGE_SETTLE - timedelta(minutes=1)
    # A Slurm id far beyond any this cluster has given: sacct knows nothing of it.
    job = ClusterJob.objects.create(
        name="purged",
        fingerprint=uuid.uuid4().hex,
        spec={},
        state="COMPLETED",
        slurm_job_id="987654321",
        submit_time=ended - timedelta(minutes=5),
        ended_at=ended,
        attempts=1,
    )

    calls = reconciler.cluster.calls["sacct"]
    reconciler.tick()
    job.refresh_from_db()
    assert job.usage == {UNAVAILABLE: "Slurm's accounting has no record of job 987654321"}
    assert reconciler.cluster.calls["sacct"] == calls + 1
    assert efficiency(job.usage) is None

    reconciler.tick()
    assert reconciler.cluster.calls["sacct"] == calls + 1
