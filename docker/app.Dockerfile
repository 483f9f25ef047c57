# syntax=docker/dockerfile:1
# The application image: web (Django), Celery worker and beat, Flower, the Prefect
# server and the Prefect runner all run from it (see compose.yaml). Build context:
# the repository root.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EMG_VAR_DIR=/var/lib/emg

# The Slurm client (sbatch, squeue, sacct) and munge, so the Celery processes can talk
# to the slurm service. The key the package generates is removed: the real one comes
# from the shared munge-key volume (docker/app-entrypoint.sh installs it).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-client munge \
    && rm -rf /var/lib/apt/lists/* \
    && rm -f /etc/munge/munge.key \
    && mkdir -p /var/lib/emg/work /var/lib/emg/results /var/lib/emg/prefect-results /var/lib/emg/beat /var/lib/emg/munge \
    # Every service runs as this user (the entrypoint drops root after munge is set up), and so
    # does every Slurm job it submits: the slurm image has the same user, with the same uid.
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/emg --no-create-home --shell /usr/sbin/nologin emg \
    && chown emg:emg /var/lib/emg /var/lib/emg/work /var/lib/emg/results /var/lib/emg/prefect-results /var/lib/emg/beat

# The source stays in /opt/emg as well as being installed: the Prefect runner imports
# flows by their path relative to its working directory, and manage.py lives here.
WORKDIR /opt/emg
# Dependencies first, from the lock (exact versions, hashes checked), so a source change
# does not reinstall them. The lock holds the test and lint tools too: one lock, the same
# versions the test suite ran with.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
COPY pyproject.toml manage.py ./
COPY emg ./emg
COPY workers ./workers
COPY flows ./flows
COPY slurm_adapter ./slurm_adapter
COPY pipelines ./pipelines
RUN pip install --no-deps .
# The admin's static files, collected once into the image (served by WhiteNoise). Debug mode only
# for this step, which needs no secret key; nothing of it stays in the image's environment.
RUN DJANGO_DEBUG=1 DATABASE_URL=sqlite://:memory: python manage.py collectstatic --noinput

COPY --chmod=0755 docker/app-entrypoint.sh /usr/local/bin/emg-entrypoint

ENTRYPOINT ["emg-entrypoint"]
CMD ["gunicorn", "emg.wsgi:application", "--bind", "0.0.0.0:8000", "--access-logfile", "-"]
