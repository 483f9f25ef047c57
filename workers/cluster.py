import logging
import shutil
from functools import cache

from django.conf import settings

from slurm_adapter import Cluster, LocalCluster, SlurmCluster

logger = logging.getLogger(__name__)


def resolved_backend() -> str:
    """`auto` means the real cluster wherever Slurm's client is installed."""
    backend = settings.EMG_CLUSTER_BACKEND
    if backend == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    return backend


@cache
def configured_cluster() -> Cluster:
    backend = resolved_backend()
    if backend == "slurm":
        return SlurmCluster(
            min_query_interval_s=settings.EMG_SLURM_MIN_QUERY_INTERVAL_SECONDS,
            accounting_grace_s=settings.EMG_SLURM_ACCOUNTING_GRACE_SECONDS,
        )
    if backend == "local":
        return LocalCluster(root_dir=str(settings.EMG_WORK_DIR / "local-cluster"))
    raise ValueError(f"EMG_CLUSTER_BACKEND={backend!r}: expected slurm, local or auto")
