"""The cluster backend the settings select, built in one place for the workers and the health check."""

from django.conf import settings

from slurm_adapter import Cluster, make_cluster


def cluster_from_settings() -> Cluster:
    return make_cluster(
        settings.EMG_CLUSTER_BACKEND,
        root_dir=str(settings.EMG_WORK_DIR / "local-cluster"),
        min_query_interval_s=settings.EMG_SLURM_MIN_QUERY_INTERVAL_SECONDS,
        accounting_grace_s=settings.EMG_SLURM_ACCOUNTING_GRACE_SECONDS,
        rest_url=settings.EMG_SLURMRESTD_URL,
        rest_user=settings.EMG_SLURMRESTD_USER,
        rest_token=settings.EMG_SLURMRESTD_TOKEN,
        rest_token_file=settings.EMG_SLURMRESTD_TOKEN_FILE,
        rest_api_version=settings.EMG_SLURMRESTD_API_VERSION,
        rest_timeout_s=settings.EMG_SLURMRESTD_TIMEOUT_SECONDS,
        rest_retries=settings.EMG_SLURMRESTD_RETRIES,
    )
