from functools import cache

from emg.cluster import cluster_from_settings
from slurm_adapter import Cluster


@cache
def configured_cluster() -> Cluster:
    return cluster_from_settings()
