# syntax=docker/dockerfile:1
# A single-node Slurm cluster "emg" for compose.yaml: munged, MariaDB + slurmdbd (sacct
# needs accounting), slurmctld and slurmd, supervised by docker/slurm-entrypoint.sh.
# Build context: the repository root.
FROM debian:bookworm

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        slurm-wlm slurmdbd munge mariadb-server mariadb-client procps python3 \
    && rm -rf /var/lib/apt/lists/* \
    && rm -f /etc/munge/munge.key \
    && mkdir -p /var/lib/emg/work /var/lib/emg/results /var/lib/emg/munge /var/lib/emg/slurm-conf /var/lib/emg-slurm \
    # The user the app services submit as (docker/app.Dockerfile, same uid): its jobs run as it, not
    # as root, and write the work and results volumes it owns.
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/emg --no-create-home --shell /usr/sbin/nologin emg \
    && chown emg:emg /var/lib/emg/work /var/lib/emg/results

# python3: the pipeline stand-ins (and their trace module, pipelines/nextflow_trace.py) are Python.
# Jobs run the pipeline from here (EMG_PIPELINE_COMMAND in compose.yaml); the
# application image has it at the same path.
COPY pipelines /opt/emg/pipelines
# slurm.conf and slurmdbd.conf templates, the same scripts/slurm-up.sh renders.
COPY slurm /opt/emg/slurm
COPY --chmod=0755 docker/slurm-entrypoint.sh /usr/local/bin/slurm-entrypoint

# slurmctld, slurmd, slurmdbd
EXPOSE 6817 6818 6819
ENTRYPOINT ["slurm-entrypoint"]
