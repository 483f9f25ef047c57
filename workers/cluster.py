from functools import cache

from django.conf import settings

from slurm_adapter import Cluster, make_cluster


@cache
def configured_cluster() -> Cluster:
    return make_cluster(
        settings.EMG_CLUSTER_BACKEND,
        root_dir=str(settings.EMG_WORK_DIR / "local-cluster"),
        min_query_interval_s=settings.EMG_SLURM_MIN_QUERY_INTERVAL_SECONDS,
        accounting_grace_s=settings.EMG_SLURM_ACCOUNTING_GRACE_SECONDS,
    )
