"""Submitting and tracking batch jobs on Slurm, or on local processes.

Pure standard library: no Django, no Prefect. Pick a backend with make_cluster().
"""

from __future__ import annotations

import shutil
from typing import Any

from .cluster import Cluster, ClusterError, JobStatus, SubmittedJob
from .local import LocalCluster
from .logs import tail_log
from .slurm import SlurmCluster
from .spec import JobSpec, safe_job_name, validate_tag
from .states import JobState, UnknownSlurmState, map_slurm_state
from .status import parse_exit_code, parse_sacct

__all__ = [
    "Cluster",
    "ClusterError",
    "JobSpec",
    "JobState",
    "JobStatus",
    "LocalCluster",
    "SlurmCluster",
    "SubmittedJob",
    "UnknownSlurmState",
    "make_cluster",
    "map_slurm_state",
    "parse_exit_code",
    "parse_sacct",
    "safe_job_name",
    "tail_log",
    "validate_tag",
]


def make_cluster(backend: str, **kwargs: Any) -> Cluster:
    """backend: "slurm", "local" (needs root_dir=...), or "auto" (slurm if sbatch is on PATH)."""
    if backend == "auto":
        # Callers of "auto" pass what either backend needs; each takes its own.
        if shutil.which("sbatch"):
            backend = "slurm"
            kwargs.pop("root_dir", None)
        else:
            backend = "local"
            kwargs = {k: v for k, v in kwargs.items() if k == "root_dir"}
    if backend == "slurm":
        return SlurmCluster(**kwargs)
    if backend == "local":
        return LocalCluster(**kwargs)
    raise ValueError(f"unknown cluster backend {backend!r}; expected 'slurm', 'local' or 'auto'")
