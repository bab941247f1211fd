#!/usr/bin/env bash
# A real one-node SLURM cluster for development and tests (Debian/Ubuntu, run as root).
#
#   slurm/dev-cluster.sh install   apt-get install slurmctld slurmd slurm-client munge, and
#                                  slurmdbd + mariadb-server (if missing)
#   slurm/dev-cluster.sh start     install if needed, write slurm.conf, start munged, mariadb,
#                                  slurmdbd, slurmctld, slurmd (in that order), wait until the
#                                  node is idle.
#                                  Idempotent: an already running cluster is left alone.
#   slurm/dev-cluster.sh stop      stop the daemons (by the pid files they wrote)
#   slurm/dev-cluster.sh status    daemons and `sinfo`
#
# Daemons run without systemd (containers have none): each writes a pid file that `stop` uses.
# Accounting (slurmdbd on MariaDB, reached only through its unix socket, no TCP) is there
# because `sacct` is how submitit (and people) learn the state of finished or cancelled jobs;
# without it a cancelled array task would look pending forever. slurmdbd runs as root and
# logs into MariaDB as root through unix_socket authentication: no password anywhere.
# Environment: DEV_SLURM_MEM_MB (RealMemory, default: 3/4 of RAM), DEV_SLURM_CPUS (default nproc),
# DEV_SLURM_WAIT_S (how long `start` waits for the node to be idle, default 60).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
SPOOL_CTLD=/var/spool/slurmctld
SPOOL_D=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
NODE=$(hostname)
WAIT_S=${DEV_SLURM_WAIT_S:-60}

log() { echo "[dev-cluster] $*" >&2; }

need_root() {
    if [[ $(id -u) -ne 0 ]]; then
        log "must run as root (it installs packages and starts daemons)"
        exit 77
    fi
}

have_binaries() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v sbatch >/dev/null && command -v munged >/dev/null &&
        command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null
}

cmd_install() {
    need_root
    if have_binaries; then
        log "slurm and munge already installed"
        return 0
    fi
    log "installing slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # --no-install-recommends: the daemons only; policy-rc.d keeps the packages' init scripts
    # from trying to start services during install (no init system in a container).
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created_policy=1
    fi
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge \
        slurmdbd mariadb-server
    if [[ $created_policy -eq 1 ]]; then rm -f "$policy"; fi
    have_binaries || { log "install finished but binaries are missing"; exit 1; }
}

write_conf() {
    local cpus mem_mb
    cpus=${DEV_SLURM_CPUS:-$(nproc)}
    mem_mb=${DEV_SLURM_MEM_MB:-$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 3 / 4}' /proc/meminfo)}
    mkdir -p "$CONF_DIR" "$SPOOL_CTLD" "$SPOOL_D" "$LOG_DIR" "$RUN_DIR"
    chmod 755 "$SPOOL_CTLD" "$SPOOL_D"
    cat >"$CONF.tmp" <<EOF
# Written by slurm/dev-cluster.sh: a one-node development cluster.
ClusterName=dev
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, every job would get the whole node's memory and run alone.
DefMemPerCPU=$((mem_mb / cpus))
# Bind the daemons to the node's address ($NODE resolves to 127.0.0.1), not to 0.0.0.0.
CommunicationParameters=NoInAddrAny
ReturnToService=2
SchedulerType=sched/backfill
# Short intervals so tests see state changes quickly.
SchedulerTimeSlice=5
MinJobAge=300
KillWait=5
InactiveLimit=0
Waittime=0
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$SPOOL_CTLD
SlurmdSpoolDir=$SPOOL_D
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MaxArraySize=100001
MaxJobCount=200000
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    # No cgroup.conf: proctrack/linuxproc + task/none need no cgroups (containers often lack
    # a writable cgroup tree), and slurm 22.05 has no CgroupPlugin=disabled.
    mv "$CONF.tmp" "$CONF"
    chmod 644 "$CONF"
}

ensure_munge_key() {
    local key=/etc/munge/munge.key
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [[ ! -s $key ]]; then
        log "creating munge key"
        (umask 077 && dd if=/dev/urandom of="$key" bs=1 count=1024 status=none)
    fi
    local owner=root
    id munge >/dev/null 2>&1 && owner=munge
    chown "$owner:$owner" "$key" /etc/munge /var/lib/munge /var/log/munge /run/munge
    chmod 400 "$key"
    chmod 700 /etc/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
}

pid_alive() { # pidfile
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_munge() {
    if pid_alive /run/munge/munged.pid && munge -n </dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    ensure_munge_key
    local user=root
    id munge >/dev/null 2>&1 && user=munge
    if [[ $user == root ]]; then
        munged --force
    else
        runuser -u munge -- munged
    fi
    for _ in $(seq 50); do
        munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    log "munged did not come up"; exit 1
}

write_dbd_conf() {
    local conf=$CONF_DIR/slurmdbd.conf
    cat >"$conf.tmp" <<EOF
# Written by slurm/dev-cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
EOF
    chmod 600 "$conf.tmp"
    mv "$conf.tmp" "$conf"
}

start_mariadb() {
    local sock=/run/mysqld/mysqld.sock
    if pid_alive /run/mysqld/mysqld.pid && mariadb-admin --socket=$sock ping >/dev/null 2>&1; then
        return 0
    fi
    mkdir -p /run/mysqld
    chown mysql:mysql /run/mysqld
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    fi
    # --skip-networking: the unix socket only; nothing listens on TCP.
    (setsid mariadbd --user=mysql --skip-networking --socket=$sock \
        --pid-file=/run/mysqld/mysqld.pid --innodb-buffer-pool-size=64M \
        >>$LOG_DIR/mariadb.log 2>&1 </dev/null &)
    for _ in $(seq 100); do
        mariadb-admin --socket=$sock ping >/dev/null 2>&1 && break
        sleep 0.2
    done
    mariadb --socket=$sock -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db" ||
        { log "mariadb did not come up; see $LOG_DIR/mariadb.log"; exit 1; }
}

start_slurmdbd() {
    if ! pid_alive $RUN_DIR/slurmdbd.pid; then
        slurmdbd
    fi
    for _ in $(seq 100); do
        sacctmgr -n list cluster >/dev/null 2>&1 && break
        sleep 0.2
    done
    if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx dev; then
        sacctmgr -i add cluster dev >/dev/null
    fi
}

node_state() {
    sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | head -n1 | tr -d '*~#!%$@^-'
}

cmd_start() {
    need_root
    have_binaries || cmd_install
    if pid_alive $RUN_DIR/slurmctld.pid && pid_alive $RUN_DIR/slurmd.pid &&
        pid_alive $RUN_DIR/slurmdbd.pid &&
        [[ $(node_state) =~ ^(idle|mix|alloc)$ ]]; then
        log "already running"
        return 0
    fi
    write_conf
    write_dbd_conf
    start_munge
    start_mariadb
    start_slurmdbd
    if ! pid_alive $RUN_DIR/slurmctld.pid; then
        # -c would wipe queued jobs; keep state so a restart loses nothing (ReturnToService=2).
        slurmctld
    fi
    for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
    if ! pid_alive $RUN_DIR/slurmd.pid; then
        slurmd
    fi
    local state=""
    for _ in $(seq $((WAIT_S * 2))); do
        state=$(node_state)
        if [[ $state =~ ^(idle|mix|alloc)$ ]]; then
            log "node $NODE is $state"
            sinfo >&2
            return 0
        fi
        # A node left down/drained by an earlier run: resume it.
        if [[ $state =~ ^(down|drain|drng|fail)$ ]]; then
            scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
        fi
        sleep 0.5
    done
    log "node $NODE not idle after ${WAIT_S}s (state '$state'); see $LOG_DIR"
    tail -n 20 $LOG_DIR/slurmctld.log $LOG_DIR/slurmd.log >&2 || true
    exit 1
}

stop_pidfile() { # name pidfile
    if pid_alive "$2"; then
        local pid
        pid=$(cat "$2")
        kill -TERM "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        log "stopped $1 ($pid)"
    fi
}

cmd_stop() {
    need_root
    stop_pidfile slurmd $RUN_DIR/slurmd.pid
    stop_pidfile slurmctld $RUN_DIR/slurmctld.pid
    stop_pidfile slurmdbd $RUN_DIR/slurmdbd.pid
    stop_pidfile mariadbd /run/mysqld/mysqld.pid
    stop_pidfile munged /run/munge/munged.pid
}

cmd_status() {
    local rc=0
    for d in munged:/run/munge/munged.pid mariadbd:/run/mysqld/mysqld.pid \
        slurmdbd:$RUN_DIR/slurmdbd.pid slurmctld:$RUN_DIR/slurmctld.pid slurmd:$RUN_DIR/slurmd.pid; do
        if pid_alive "${d#*:}"; then echo "${d%%:*}: running ($(cat "${d#*:}"))"; else echo "${d%%:*}: stopped"; rc=3; fi
    done
    if command -v sinfo >/dev/null; then sinfo 2>&1 || rc=3; fi
    return $rc
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 {install|start|stop|status}" >&2; exit 2 ;;
esac
