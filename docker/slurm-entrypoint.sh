#!/bin/bash
# Entry point of the slurm service (docker/slurm.Dockerfile): a one-node cluster "emg"
# whose controller and only node are this container (hostname "slurm").
#
# 1. Creates the munge key in the shared volume if absent, and publishes slurm.conf
#    there, for the Celery containers (their sbatch/squeue/sacct need both).
# 2. Starts munged, MariaDB, slurmdbd, slurmctld and slurmd in the foreground, in that
#    order, each once the previous one answers.
# 3. Supervises them: if any exits, it stops the others and exits non-zero so that the
#    restart policy restarts the container; SIGTERM stops them all cleanly.
#
# Tunables (environment): EMG_SLURM_CPUS (default 8) and EMG_SLURM_MEM_MB (default
# 16384) are what the node advertises; EMG_SLURM_UP_TIMEOUT (default 120 s).
set -euo pipefail

CLUSTER=emg
HOST=${EMG_SLURM_HOST:-$(cat /proc/sys/kernel/hostname)} # "slurm": compose.yaml sets it
CONF_DIR=/etc/slurm
SHARED_CONF_DIR=${EMG_SLURM_SHARED_CONF_DIR:-/var/lib/emg/slurm-conf}
SHARED_KEY=${EMG_MUNGE_KEY_FILE:-/var/lib/emg/munge/munge.key}
STATE_DIR=/var/lib/emg-slurm
LOG_DIR=/var/log/emg-slurm
RUN_DIR=/run/emg-slurm
CPUS=${EMG_SLURM_CPUS:-8}
MEM_MB=${EMG_SLURM_MEM_MB:-16384}
DEADLINE_S=${EMG_SLURM_UP_TIMEOUT:-120}
TEMPLATES=${EMG_SLURM_TEMPLATES:-/opt/emg/slurm} # slurm/ of the repository (docker/slurm.Dockerfile)

log() { echo "slurm-entrypoint: $*" >&2; }

pids=()
stop_all() {
    local pid
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do # reverse start order
        pid=${pids[i]}
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
trap 'log "stopping"; stop_all; exit 0' TERM INT

wait_for() { # what command...
    local what=$1; shift
    local end=$((SECONDS + DEADLINE_S))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= end)); then
            log "timed out after ${DEADLINE_S}s waiting for $what; logs in $LOG_DIR:"
            tail -n 50 "$LOG_DIR"/*.log >&2 || true
            stop_all
            exit 1
        fi
        sleep 0.5
    done
}

start() { # name command...: runs a daemon in the foreground, in the background of this script
    local name=$1; shift
    "$@" </dev/null >>"$LOG_DIR/$name.log" 2>&1 &
    pids+=($!)
    log "started $name (pid $!)"
}

mkdir -p "$CONF_DIR" "$SHARED_CONF_DIR" "$(dirname "$SHARED_KEY")" "$STATE_DIR"/ctld "$STATE_DIR"/d "$LOG_DIR" "$RUN_DIR" \
    /var/lib/emg/work

# --- munge ---------------------------------------------------------------------------
if [[ ! -s $SHARED_KEY ]]; then
    log "creating the munge key $SHARED_KEY"
    tmp=$(mktemp "$SHARED_KEY.XXXXXX")
    rm -f "$tmp"
    (umask 077 && mungekey --create --keyfile="$tmp")
    mv -f "$tmp" "$SHARED_KEY"
fi
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
install -o munge -g munge -m 0400 "$SHARED_KEY" /etc/munge/munge.key
start munged setpriv --reuid=munge --regid=munge --init-groups munged --foreground
wait_for munge bash -c 'munge -n </dev/null | unmunge'

# --- MariaDB (accounting storage for slurmdbd) --------------------------------------
install -d -o mysql -g mysql -m 0755 /run/mysqld
if [[ ! -d /var/lib/mysql/mysql ]]; then
    log "initialising MariaDB in /var/lib/mysql"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$LOG_DIR/mariadb.log" 2>&1
fi
chown -R mysql:mysql /var/lib/mysql
start mariadb mariadbd --user=mysql --datadir=/var/lib/mysql --bind-address=127.0.0.1
# root over the Unix socket (unix_socket authentication): no password anywhere.
wait_for MariaDB mariadb -u root -e 'SELECT 1'
mariadb -u root -e 'CREATE DATABASE IF NOT EXISTS slurm_acct_db'

# --- configuration -------------------------------------------------------------------
# The text is slurm/*.conf.in, shared with scripts/slurm-up.sh. No cgroup plugins: a container
# without systemd cannot delegate cgroups to slurmd, so processes are tracked through /proc and
# over-memory jobs are killed by the poller.
TRACKING="ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherParams=OverMemoryKill"
bash "$TEMPLATES/render.sh" "$TEMPLATES/slurm.conf.in" GENERATOR=docker/slurm-entrypoint.sh CLUSTER="$CLUSTER" \
    CONTROL_HOST="$HOST" HOST="$HOST" HOST_ADDR="$HOST" CPUS="$CPUS" MEM_MB="$MEM_MB" STATE_DIR="$STATE_DIR" \
    RUN_DIR="$RUN_DIR" LOG_DIR="$LOG_DIR" TRACKING="$TRACKING" EXTRA="" >"$CONF_DIR/slurm.conf"
cat >"$CONF_DIR/cgroup.conf" <<CONF
CgroupPlugin=autodetect
IgnoreSystemd=yes
CONF
(umask 077 && bash "$TEMPLATES/render.sh" "$TEMPLATES/slurmdbd.conf.in" GENERATOR=docker/slurm-entrypoint.sh \
    HOST="$HOST" RUN_DIR="$RUN_DIR" LOG_DIR="$LOG_DIR" DB_HOST=localhost DB_PORT=3306 EXTRA="" \
    >"$CONF_DIR/slurmdbd.conf")
# Published atomically for the clients in the other containers.
cp "$CONF_DIR/slurm.conf" "$SHARED_CONF_DIR/.slurm.conf.new"
chmod 0644 "$SHARED_CONF_DIR/.slurm.conf.new"
mv -f "$SHARED_CONF_DIR/.slurm.conf.new" "$SHARED_CONF_DIR/slurm.conf"

# --- Slurm daemons -----------------------------------------------------------------------
start slurmdbd slurmdbd -D
wait_for slurmdbd sacctmgr -n -P list cluster format=cluster
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi
start slurmctld slurmctld -D
wait_for slurmctld scontrol ping
start slurmd slurmd -D -N "$HOST"

node_state() { sinfo -h -n "$HOST" -o %t 2>/dev/null; }
case $(node_state) in
    down* | drain* | drng* | fail*) scontrol update nodename="$HOST" state=resume || true ;;
esac
wait_for "node $HOST to be usable" bash -c "[[ \$(sinfo -h -n $HOST -o %t) =~ ^(idle|mix|alloc|comp) ]]"
log "cluster $CLUSTER ready on $HOST with $CPUS CPUs and $MEM_MB MB"

# --- supervise ---------------------------------------------------------------------------------
# `wait -n` returns when any daemon exits (or a trapped signal arrives).
set +e
wait -n "${pids[@]}"
status=$?
log "a daemon exited (status $status); stopping the others"
stop_all
exit 1
