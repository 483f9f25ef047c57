"""Submitting and tracking batch jobs on Slurm (its commands, or slurmrestd), or on local processes.

No Django, no Prefect: the standard library, and httpx for slurmrestd. Pick a backend with make_cluster().
"""

from __future__ import annotations

import shutil
from typing import Any

from .arrays import ArrayTask
from .cluster import Cluster, ClusterError, JobStatus, PartitionLimits, SubmissionRejected, SubmittedJob
from .local import LocalCluster
from .logs import tail_log
from .rest import RestCluster
from .slurm import SlurmCluster
from .spec import JobSpec, safe_job_name, validate_tag
from .states import JobState, UnknownSlurmState, map_slurm_state
from .status import parse_exit_code, parse_sacct
from .usage import JobUsage, parse_usage

__all__ = [
    "ArrayTask",
    "Cluster",
    "ClusterError",
    "JobSpec",
    "JobState",
    "JobStatus",
    "JobUsage",
    "LocalCluster",
    "PartitionLimits",
    "RestCluster",
    "SlurmCluster",
    "SubmissionRejected",
    "SubmittedJob",
    "UnknownSlurmState",
    "make_cluster",
    "map_slurm_state",
    "parse_exit_code",
    "parse_sacct",
    "parse_usage",
    "resolve_backend",
    "safe_job_name",
    "tail_log",
    "validate_tag",
]


def resolve_backend(backend: str) -> str:
    """ "auto" means the real cluster wherever Slurm's client is installed."""
    if backend == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    return backend


_LOCAL_OPTIONS = frozenset({"root_dir"})
_SLURM_OPTIONS = frozenset({"min_query_interval_s", "accounting_grace_s", "command_timeout_s", "find_window"})
# The REST backend's own options come prefixed (rest_url=...), so that one call can carry every backend's.
_REST_PREFIX = "rest_"


def make_cluster(backend: str, **options: Any) -> Cluster:
    """backend: "slurm", "slurmrestd" (needs rest_url, rest_user and rest_token or rest_token_file),
    "local" (needs root_dir=...), or "auto" (slurm if sbatch is on PATH, else local).

    Callers may pass what every backend needs; each takes its own options.
    """
    backend = resolve_backend(backend)
    if backend == "slurm":
        return SlurmCluster(**{k: v for k, v in options.items() if k in _SLURM_OPTIONS})
    if backend == "slurmrestd":
        shared = {k: v for k, v in options.items() if k in _SLURM_OPTIONS - {"command_timeout_s"}}
        own = {k.removeprefix(_REST_PREFIX): v for k, v in options.items() if k.startswith(_REST_PREFIX)}
        return RestCluster(**shared, **own)
    if backend == "local":
        return LocalCluster(**{k: v for k, v in options.items() if k in _LOCAL_OPTIONS})
    raise ValueError(f"unknown cluster backend {backend!r}; expected 'slurm', 'slurmrestd', 'local' or 'auto'")
