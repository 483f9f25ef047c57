"""Where an attempt is in Slurm: found by its tag, whether it went alone or as a task of an array.

An attempt submitted alone carries its own tag (emg.models.job_tag) in its comment and job name.
The tasks of a job array share the array's tag (emg.models.array_tag), and each is told apart by
its index, recorded on its row when it was claimed: Slurm names it "<array id>_<index>". The
array's files (its script, the manifest of its tasks' scripts and logs, and their tags in index
order) are in EMG_WORK_DIR/arrays/<array tag>/, where every node sees them.
"""

from pathlib import Path

from django.conf import settings

from emg.models import ClusterJob
from slurm_adapter import JobStatus
from slurm_adapter.arrays import ARRAY_NAME, split_task_id


def array_files_dir(tag: str) -> Path:
    return settings.EMG_WORK_DIR / "arrays" / tag


def find_attempt(cluster, job: ClusterJob) -> list[JobStatus]:
    """Slurm's records of the job's current attempt, newest first (ClusterError, ValueError if it
    could not be asked): by its own tag, or by its array's tag and its index there."""
    if not job.array_tag:
        return cluster.find_by_tag(job.tag, spec_name=job.spec["name"], since=job.submission_started_at)
    found = cluster.find_by_tag(job.array_tag, spec_name=ARRAY_NAME, since=job.submission_started_at)
    return [record for record in found if (task := split_task_id(record.job_id)) and task[1] == job.array_index]
