#!/usr/bin/env bash
# Stops the daemons scripts/slurm-up.sh started, by their pid files, and waits
# for them to exit (slurmrestd first: it talks to the others). Jobs and
# accounting survive in /var/lib/emg-slurm and MariaDB. --keep-munge leaves
# munged running (used by slurm-up.sh on a configuration change).
set -euo pipefail

RUN_DIR=/run/emg-slurm
DEADLINE_S=${EMG_SLURM_DOWN_TIMEOUT:-30}

daemons=(slurmrestd slurmd slurmctld slurmdbd)
[[ ${1:-} == --keep-munge ]] || daemons+=(munged)

pidfile() {
    case $1 in
        munged) echo /run/munge/munged.pid ;;
        *) echo "$RUN_DIR/$1.pid" ;;
    esac
}

stopped=()
for d in "${daemons[@]}"; do
    f=$(pidfile "$d")
    [[ -s $f ]] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        end=$((SECONDS + DEADLINE_S))
        while kill -0 "$pid" 2>/dev/null; do
            if ((SECONDS >= end)); then
                echo "slurm-down: $d (pid $pid) ignored SIGTERM for ${DEADLINE_S}s, killing it" >&2
                kill -KILL "$pid" 2>/dev/null || true
            fi
            sleep 0.1
        done
        stopped+=("$d")
    fi
    rm -f "$f"
done

if ((${#stopped[@]})); then
    echo "slurm-down: stopped ${stopped[*]}"
else
    echo "slurm-down: nothing was running"
fi
