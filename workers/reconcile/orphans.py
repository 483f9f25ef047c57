"""Cancelling Slurm jobs of ours that no row owns: the last line of defence, not the first.

A job is an orphan when its tag names a row of ours (the fingerprint prefix matches) and an
attempt that row has superseded, or the row has ended or recorded another job for that attempt.
That happens only when an sbatch answer arrives after its claim was superseded by a tick that
found nothing by tag, *and* the submitting tick died before cancelling what it queued. A job whose
tag is the row's current attempt while the row is still claimed is never an orphan: its answer
may still be on its way. A task of a job array carries the array's tag: its own tag (the attempt
it was claimed for) is read from the array's list of tags, by its index.
"""

import logging
import re
import time

from emg.models import ARRAY_TAG_PREFIX, ClusterJob, ClusterJobState
from slurm_adapter.arrays import read_tags, split_task_id
from workers.reconcile.attempts import array_files_dir

logger = logging.getLogger(__name__)

TAG = re.compile(r"^(?P<fingerprint>[0-9a-f]{16})-(?P<row>\d+)-(?P<attempt>\d+)$")
# Orphans arise only where a claim was superseded: the sweep runs in every tick that superseded one,
# and otherwise this often, so a steady tick stays one Slurm call.
SWEEP_INTERVAL_SECONDS = 300
_last_sweep = time.monotonic()


def cancel_orphans(reconciler, report) -> None:
    global _last_sweep
    if not report.claims_superseded and time.monotonic() - _last_sweep < SWEEP_INTERVAL_SECONDS:
        return
    _last_sweep = time.monotonic()
    live = reconciler.cluster.active_jobs()
    tagged = {}
    array_tags: dict[str, list[str]] = {}
    for status in live:
        match = TAG.fullmatch(attempt_tag(status.job_id, status.tag or "", array_tags))
        if match:
            tagged[status.job_id] = (match["fingerprint"], int(match["row"]), int(match["attempt"]))
    rows = ClusterJob.objects.in_bulk({row for _, row, _ in tagged.values()})
    for job_id, (fingerprint, row_id, attempt) in tagged.items():
        row = rows.get(row_id)
        if row is None or not row.fingerprint.startswith(fingerprint):
            continue  # not ours (another instance on this Slurm account), or a row since deleted
        if not is_orphan(row, job_id, attempt):
            continue
        try:
            reconciler.cluster.cancel(job_id)
        except Exception as error:  # the others are still worth cancelling
            report.errors.append(f"orphan Slurm job {job_id} (row #{row_id}, attempt {attempt}): {error}")
            continue
        report.orphans_cancelled.append(job_id)
        logger.error(
            "cancelled Slurm job %s: attempt %s of job #%s, which no row owns (the row is %s, attempt %s, "
            "Slurm job %r)",
            job_id,
            attempt,
            row_id,
            row.state,
            row.attempts,
            row.slurm_job_id,
        )


def is_orphan(row: ClusterJob, job_id: str, attempt: int) -> bool:
    if attempt < row.attempts:
        return True
    if attempt > row.attempts:
        return False  # a claim newer than our read of the row: not ours to judge yet
    if row.slurm_job_id:
        return row.slurm_job_id != job_id
    # The row's current attempt, with no Slurm id recorded: in flight while the row is claimed,
    # an orphan once the row has ended without it (rejected, or cancelled before submission).
    return row.state != ClusterJobState.DECLARED


def attempt_tag(job_id: str, tag: str, array_tags: dict[str, list[str]]) -> str:
    """The tag of the attempt a Slurm job is: its own, or for an array's task the one it was claimed
    under (from the array's files, read once per sweep; "" when they cannot be read)."""
    task = split_task_id(job_id)
    if task is None or not tag.startswith(ARRAY_TAG_PREFIX):
        return tag
    if tag not in array_tags:
        try:
            array_tags[tag] = read_tags(str(array_files_dir(tag)))
        except (OSError, ValueError):
            array_tags[tag] = []
    tags = array_tags[tag]
    return tags[task[1]] if task[1] < len(tags) else ""
