#!/usr/bin/env bash
# Starts the machine's PostgreSQL, Redis and MariaDB if they are not answering, with the
# commands this machine kind uses at boot. Leaves running services alone.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
    local port=$1 name=$2
    for _ in $(seq 1 100); do port_open "$port" && return 0; sleep 0.2; done
    echo "ensure-services: $name did not start on port $port" >&2
    return 1
}

if ! port_open 5432; then
    echo "ensure-services: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
    wait_port 5432 PostgreSQL
fi
if ! port_open 6379; then
    echo "ensure-services: starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_port 6379 Redis
fi
if ! port_open 3306; then
    echo "ensure-services: starting MariaDB"
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    wait_port 3306 MariaDB
fi
