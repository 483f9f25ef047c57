"""Submitting and tracking batch jobs on Slurm, or on local processes.

Pure standard library: no Django, no Prefect. Pick a backend with make_cluster().
"""

from __future__ import annotations

import shutil
from typing import Any

from .cluster import Cluster, ClusterError, JobStatus, PartitionLimits, SubmissionRejected, SubmittedJob
from .local import LocalCluster
from .logs import tail_log
from .slurm import SlurmCluster
from .spec import JobSpec, safe_job_name, validate_tag
from .states import JobState, UnknownSlurmState, map_slurm_state
from .status import parse_exit_code, parse_sacct
from .usage import JobUsage, parse_usage

__all__ = [
    "Cluster",
    "ClusterError",
    "JobSpec",
    "JobState",
    "JobStatus",
    "JobUsage",
    "LocalCluster",
    "PartitionLimits",
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
    """"auto" means the real cluster wherever Slurm's client is installed."""
    if backend == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    return backend


_LOCAL_OPTIONS = frozenset({"root_dir"})


def make_cluster(backend: str, **options: Any) -> Cluster:
    """backend: "slurm", "local" (needs root_dir=...), or "auto" (slurm if sbatch is on PATH).

    Callers may pass what either backend needs; each takes its own options.
    """
    backend = resolve_backend(backend)
    if backend == "slurm":
        return SlurmCluster(**{k: v for k, v in options.items() if k not in _LOCAL_OPTIONS})
    if backend == "local":
        return LocalCluster(**{k: v for k, v in options.items() if k in _LOCAL_OPTIONS})
    raise ValueError(f"unknown cluster backend {backend!r}; expected 'slurm', 'local' or 'auto'")
