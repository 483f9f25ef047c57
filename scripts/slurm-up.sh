#!/usr/bin/env bash
# Starts a single-node Slurm cluster "emg" (munged, slurmdbd on MariaDB,
# slurmctld, slurmd, and slurmrestd with JWT on 127.0.0.1:6820) without
# systemd, and waits until it schedules jobs and answers sacct and REST.
# Idempotent: daemons already running from their pid files are left alone.
# Must run as root.
#
# Tunables (environment): EMG_SLURM_CPUS (default 64), EMG_SLURM_MEM_MB
# (default 65536) are what the node advertises; it may be more than the machine
# has so that many small test jobs run side by side. EMG_SLURMRESTD_LISTEN
# (default 127.0.0.1:6820) is where slurmrestd listens.
set -euo pipefail

CLUSTER=emg
CONF_DIR=/etc/slurm
STATE_DIR=/var/lib/emg-slurm
LOG_DIR=/var/log/emg-slurm
RUN_DIR=/run/emg-slurm
CPUS=${EMG_SLURM_CPUS:-64}
MEM_MB=${EMG_SLURM_MEM_MB:-65536}
DB_HOST=127.0.0.1
DB_PORT=3306
DEADLINE_S=${EMG_SLURM_UP_TIMEOUT:-90}

started=()
t0=$SECONDS

die() { echo "slurm-up: $*" >&2; exit 1; }

# Polls a command until it succeeds or the deadline passes.
wait_for() {
    local what=$1; shift
    local end=$((SECONDS + DEADLINE_S))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || die "timed out after ${DEADLINE_S}s waiting for $what (logs: $LOG_DIR)"
        sleep 0.2
    done
}

alive() { # pidfile
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

[[ $(id -u) -eq 0 ]] || die "must run as root"

if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v slurmrestd >/dev/null; then
    echo "slurm-up: installing slurm-wlm slurmdbd slurmrestd munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm slurmdbd slurmrestd munge >/dev/null
fi

mkdir -p "$CONF_DIR" "$STATE_DIR"/ctld "$STATE_DIR"/d "$LOG_DIR" "$RUN_DIR"

# --- munge -------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

MUNGE_PID=/run/munge/munged.pid
if ! alive "$MUNGE_PID"; then
    runuser -u munge -- munged --pid-file="$MUNGE_PID" </dev/null >>"$LOG_DIR/munged.out" 2>&1
    started+=(munged)
fi
wait_for "munge" bash -c 'munge -n </dev/null | unmunge'

# --- JWT for slurmrestd ----------------------------------------------------------
# The daemons accept JWT besides munge (AuthAltTypes below); `scontrol token` mints tokens
# signed with this key. Readable by SlurmUser (root) only.
JWT_KEY=$STATE_DIR/jwt_hs256.key
if [[ ! -s $JWT_KEY ]]; then
    (umask 077 && dd if=/dev/urandom of="$JWT_KEY" bs=32 count=1 status=none)
fi
chown root:root "$JWT_KEY"
chmod 0600 "$JWT_KEY"

# --- MariaDB for accounting ----------------------------------------------------
mysql_q() { mariadb -h "$DB_HOST" -P "$DB_PORT" -u root --batch --skip-column-names -e "$1"; }
if ! mysql_q 'SELECT 1' >/dev/null 2>&1; then
    command -v mariadbd >/dev/null || die "MariaDB is not reachable at $DB_HOST:$DB_PORT and not installed"
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    wait_for "MariaDB" mysql_q 'SELECT 1'
fi
mysql_q 'CREATE DATABASE IF NOT EXISTS slurm_acct_db'

# --- configuration -------------------------------------------------------------
# With the cgroup v1 hierarchy mounted (as on this machine kind, no systemd
# needed) the kernel enforces --mem and Slurm reports OUT_OF_MEMORY; otherwise
# the accounting poller kills over-memory jobs, which then end as FAILED 0:9.
if [[ -d /sys/fs/cgroup/memory && -d /sys/fs/cgroup/freezer ]]; then
    TRACKING="ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup"
    CGROUP_CONF="CgroupPlugin=cgroup/v1
ConstrainRAMSpace=yes
ConstrainSwapSpace=yes"
else
    TRACKING="ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherParams=OverMemoryKill"
    CGROUP_CONF="CgroupPlugin=autodetect"
fi

# slurmrestd (the REST backend) authenticates with JWT; munge stays the daemons' own AuthType.
JWT_CONF="# slurmrestd: JWT as well as munge (scripts/slurm-up.sh)
AuthAltTypes=auth/jwt
AuthAltParameters=jwt_key=$JWT_KEY"

# Written only when it changes; a change restarts the running daemons so they
# do not keep serving the old one. The text is slurm/*.conf.in, shared with the
# slurm container (docker/slurm-entrypoint.sh).
TEMPLATES="$(cd "$(dirname "$0")/../slurm" && pwd)"
render_slurm_conf() {
    bash "$TEMPLATES/render.sh" "$TEMPLATES/slurm.conf.in" GENERATOR=scripts/slurm-up.sh CLUSTER="$CLUSTER" \
        CONTROL_HOST="localhost(127.0.0.1)" HOST=localhost HOST_ADDR=127.0.0.1 CPUS="$CPUS" MEM_MB="$MEM_MB" \
        STATE_DIR="$STATE_DIR" RUN_DIR="$RUN_DIR" LOG_DIR="$LOG_DIR" TRACKING="$TRACKING" EXTRA="$JWT_CONF"
}

render_slurmdbd_conf() {
    bash "$TEMPLATES/render.sh" "$TEMPLATES/slurmdbd.conf.in" GENERATOR=scripts/slurm-up.sh HOST=localhost \
        RUN_DIR="$RUN_DIR" LOG_DIR="$LOG_DIR" DB_HOST="$DB_HOST" DB_PORT="$DB_PORT" EXTRA="$JWT_CONF"
}

changed=0
write_if_changed() { # path mode
    local tmp
    tmp=$(mktemp "$1.XXXXXX")
    cat >"$tmp"
    chmod "$2" "$tmp"
    if cmp -s "$tmp" "$1"; then
        rm -f "$tmp"
    else
        mv -f "$tmp" "$1"
        changed=1
    fi
}
write_if_changed "$CONF_DIR/slurm.conf" 0644 < <(render_slurm_conf)
write_if_changed "$CONF_DIR/cgroup.conf" 0644 <<<"$CGROUP_CONF"
write_if_changed "$CONF_DIR/slurmdbd.conf" 0600 < <(render_slurmdbd_conf)
chown root:root "$CONF_DIR/slurmdbd.conf"

if ((changed)) && { alive "$RUN_DIR/slurmdbd.pid" || alive "$RUN_DIR/slurmctld.pid" || alive "$RUN_DIR/slurmd.pid"; }; then
    echo "slurm-up: configuration changed, restarting the Slurm daemons"
    "$(dirname "$0")/slurm-down.sh" --keep-munge
fi

# --- daemons -------------------------------------------------------------------
# Clients are only run from here on: before slurm.conf exists they try a DNS SRV
# lookup for the controller and hang for about a minute.
if ! alive "$RUN_DIR/slurmdbd.pid"; then
    slurmdbd </dev/null >>"$LOG_DIR/slurmdbd.out" 2>&1
    started+=(slurmdbd)
fi
wait_for "slurmdbd" sacctmgr -n -P list cluster format=cluster
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi

if ! alive "$RUN_DIR/slurmctld.pid"; then
    slurmctld </dev/null >>"$LOG_DIR/slurmctld.out" 2>&1
    started+=(slurmctld)
fi
wait_for "slurmctld" scontrol ping

if ! alive "$RUN_DIR/slurmd.pid"; then
    slurmd -N localhost </dev/null >>"$LOG_DIR/slurmd.out" 2>&1
    started+=(slurmd)
fi

# A node left down or drained (by a test, or a previous crash) is put back.
node_state() { sinfo -h -n localhost -o %t 2>/dev/null; }
case $(node_state) in
    down* | drain* | drng* | fail*) scontrol update nodename=localhost state=resume || true ;;
esac
node_usable() { [[ $(node_state) =~ ^(idle|mix|alloc|comp)$ ]]; }
wait_for "node localhost to be idle" node_usable
wait_for "sbatch to accept a job" sbatch --test-only --wrap true
wait_for "sacct" sacct -n -X -S now -o JobID

# --- slurmrestd ------------------------------------------------------------------
# It refuses to run as root (or SlurmUser), so it runs as a system user of its own; who a
# request acts for comes from its JWT. setsid (out of the caller's process group, so that a test
# harness stopping its own group leaves it be), setpriv and env all exec: $! is slurmrestd itself.
REST_USER=emg-slurmrestd
REST_LISTEN=${EMG_SLURMRESTD_LISTEN:-127.0.0.1:6820}
REST_PID=$RUN_DIR/slurmrestd.pid
id -u "$REST_USER" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$REST_USER"
if ((changed)) && alive "$REST_PID"; then
    kill -TERM "$(cat "$REST_PID")"
    wait_for "the old slurmrestd to exit" bash -c "! kill -0 $(cat "$REST_PID")"
fi
if ! alive "$REST_PID"; then
    setsid setpriv --reuid="$REST_USER" --regid="$REST_USER" --clear-groups \
        env SLURM_JWT=daemon SLURM_CONF="$CONF_DIR/slurm.conf" \
        slurmrestd -a rest_auth/jwt "$REST_LISTEN" </dev/null >>"$LOG_DIR/slurmrestd.out" 2>&1 &
    echo $! >"$REST_PID"
    started+=(slurmrestd)
fi
rest_answers() {
    local token
    token=$(scontrol token username=root lifespan=60 | sed -n 's/^SLURM_JWT=//p')
    curl -fsS -o /dev/null -H "X-SLURM-USER-NAME: root" -H "X-SLURM-USER-TOKEN: $token" \
        "http://$REST_LISTEN/slurm/v0.0.38/ping"
}
wait_for "slurmrestd on $REST_LISTEN" rest_answers

if ((${#started[@]})); then
    echo "slurm-up: started ${started[*]}; cluster $CLUSTER ready with $CPUS CPUs in $((SECONDS - t0))s"
else
    echo "slurm-up: cluster $CLUSTER already up"
fi
