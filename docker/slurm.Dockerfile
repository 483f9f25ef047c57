# syntax=docker/dockerfile:1
# A single-node Slurm cluster "emg" for compose.yaml: munged, MariaDB + slurmdbd (sacct
# needs accounting), slurmctld and slurmd, supervised by docker/slurm-entrypoint.sh.
# Build context: the repository root.
FROM debian:bookworm

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        slurm-wlm slurmdbd munge mariadb-server mariadb-client procps \
    && rm -rf /var/lib/apt/lists/* \
    && rm -f /etc/munge/munge.key \
    && mkdir -p /var/lib/emg/work /var/lib/emg/munge /var/lib/emg/slurm-conf /var/lib/emg-slurm

# Jobs run the pipeline from here (EMG_PIPELINE_COMMAND in compose.yaml); the
# application image has it at the same path.
COPY pipelines /opt/emg/pipelines
# slurm.conf and slurmdbd.conf templates, the same scripts/slurm-up.sh renders.
COPY slurm /opt/emg/slurm
COPY --chmod=0755 docker/slurm-entrypoint.sh /usr/local/bin/slurm-entrypoint

# slurmctld, slurmd, slurmdbd
EXPOSE 6817 6818 6819
ENTRYPOINT ["slurm-entrypoint"]
