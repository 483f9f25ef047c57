"""Reading what ended jobs used from Slurm's accounting, for the efficiency report.

One `sacct` call per tick, and only in ticks where some recently ended job has no usage recorded
yet. Accounting may lag the job's end (slurmdbd), and a step's peak memory comes later than the
job's state: a job whose answer has no peak (or requested) memory yet is asked about again for USAGE_SETTLE, then
recorded with what there is; one accounting has no record of by then (purged, or never run) is
recorded as unavailable, so it is not asked about in every tick. Jobs that ended more than
USAGE_WINDOW ago are not asked about.
"""

import logging
from datetime import timedelta

from django.utils import timezone

from emg import jobs
from emg.models import FINAL_JOB_STATES, ClusterJob
from slurm_adapter import SubmittedJob

logger = logging.getLogger(__name__)

USAGE_WINDOW = timedelta(days=1)
USAGE_SETTLE = timedelta(minutes=10)
USAGE_BATCH = 500
UNAVAILABLE = "unavailable"


def record_usage(reconciler, report) -> None:
    now = timezone.now()
    ended = list(
        ClusterJob.objects.filter(
            state__in=FINAL_JOB_STATES, usage__isnull=True, submit_time__isnull=False, ended_at__gte=now - USAGE_WINDOW
        )
        .exclude(slurm_job_id="")
        .order_by("ended_at")[:USAGE_BATCH]
    )
    usage_of = getattr(reconciler.cluster, "usage", None)
    if not ended or usage_of is None:
        return
    found = usage_of([SubmittedJob(job.slurm_job_id, job.submit_time or now, job.log_path) for job in ended])
    for job in ended:
        usage = found.get(job.slurm_job_id)
        settled = now - (job.ended_at or now) >= USAGE_SETTLE
        if usage is None:
            if settled:
                jobs.record_usage(job, {UNAVAILABLE: f"Slurm's accounting has no record of job {job.slurm_job_id}"})
            continue
        # Accounting fills a record in over seconds: a step's peak memory, and (seen under load on
        # 22.05) the allocation's requested memory, may be missing at first. Asked again until then.
        if (usage.max_rss_mb is None or usage.requested_memory_mb is None) and not settled:
            continue
        jobs.record_usage(job, usage.to_dict())
