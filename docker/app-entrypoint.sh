#!/bin/sh
# Entry point of the application image. When EMG_MUNGE_KEY_FILE is set (the Celery
# worker and beat, which run sbatch/squeue/sacct against the slurm service), it installs
# that shared munge key and starts munged first, waiting for the key if the slurm
# service has not written it yet. Then it runs the command as the user emg.
set -eu

if [ -n "${EMG_MUNGE_KEY_FILE:-}" ]; then
    waited=0
    until [ -s "$EMG_MUNGE_KEY_FILE" ]; do
        if [ "$waited" -ge "${EMG_MUNGE_KEY_TIMEOUT:-120}" ]; then
            echo "emg-entrypoint: no munge key at $EMG_MUNGE_KEY_FILE after ${waited}s (is the slurm service up?)" >&2
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    # Copied, not used in place: munged insists on owning its key, and the munge uid
    # differs between this image and the slurm image.
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    install -o munge -g munge -m 0400 "$EMG_MUNGE_KEY_FILE" /etc/munge/munge.key
    setpriv --reuid=munge --regid=munge --init-groups munged
    tries=0
    until munge -n </dev/null | unmunge >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ "$tries" -ge 50 ]; then
            echo "emg-entrypoint: munged did not start" >&2
            exit 1
        fi
        sleep 0.2
    done
fi

# The services themselves, and the Slurm jobs they submit, run as the unprivileged user of the image.
if [ "$(id -u)" = 0 ] && id emg >/dev/null 2>&1; then
    exec setpriv --reuid=emg --regid=emg --init-groups "$@"
fi
exec "$@"
