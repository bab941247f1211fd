#!/usr/bin/env bash
# A real one-node SLURM cluster for development and tests (Debian/Ubuntu, run as root).
#
#   slurm/dev-cluster.sh install   apt-get install slurmctld slurmd slurm-client munge, and
#                                  slurmdbd + mariadb-server (if missing)
#   slurm/dev-cluster.sh start [--state FILE]
#                                  install if needed, write slurm.conf, start munged, mariadb,
#                                  slurmdbd, slurmctld, slurmd (in that order), wait until the
#                                  node is idle. Idempotent: a daemon already running (someone's
#                                  cluster) is left alone. With --state (or DEV_SLURM_STATE),
#                                  each daemon *this call* started is appended to FILE as
#                                  "name pid starttime"; a daemon that was running is not.
#   slurm/dev-cluster.sh start-netns --state FILE [--dir DIR]
#                                  a second, two-node cluster (see "Two nodes" below); prints
#                                  its directory, whose cluster.env says how to reach it.
#   slurm/dev-cluster.sh stop --state FILE
#                                  stop exactly the daemons FILE lists (what one `start` or
#                                  `start-netns` started, by pid and start time), and the
#                                  processes they spawned; delete the network namespaces and the
#                                  directory it created; nothing else. The test fixtures' teardown.
#   slurm/dev-cluster.sh stop      stop the cluster, whoever started it (by its pid files)
#   slurm/dev-cluster.sh status    daemons and `sinfo`
#
# Daemons run without systemd (containers have none): each writes a pid file.
# Accounting (slurmdbd on MariaDB, reached only through its unix socket, no TCP) is there
# because `sacct` is how submitit (and people) learn the state of finished or cancelled jobs;
# without it a cancelled array task would look pending forever. slurmdbd runs as root and
# logs into MariaDB as root through unix_socket authentication: no password anywhere.
#
# Loopback only: slurmctld 127.0.0.1:6817, slurmd 127.0.0.1:6818, slurmdbd 127.0.0.1:6819;
# munged and mariadbd have unix sockets only. SLURM 22.05 has no bind-address setting: a
# daemon binds to 0.0.0.0 unless CommunicationParameters says NoInAddrAny (slurmd, slurmdbd)
# or NoCtldInAddrAny (slurmctld; it ignores NoInAddrAny), and then binds to whatever
# getaddrinfo() gives for gethostname() (slurm_setup_addr). NodeAddr, SlurmctldHost's address
# and DbdAddr only say where the others connect. That is why the daemons were seen on 0.0.0.0
# (slurmctld had only NoInAddrAny; slurmdbd reads CommunicationParameters from slurmdbd.conf,
# which had none), and why the node name must not come from `hostname`, which may resolve to
# a LAN address. So: the node is called "localhost" (SlurmctldHost=localhost(127.0.0.1),
# NodeName=localhost NodeAddr=127.0.0.1), and slurmctld, slurmdbd and slurmd run in a UTS
# namespace of their own whose hostname is "localhost" (unshare --uts): they bind to
# 127.0.0.1 whatever this machine is called, and /etc/hosts and the machine's hostname stay
# as they are. Jobs inherit slurmd's namespace (`hostname` in a job says localhost, as
# SLURMD_NODENAME does), so srun inside a job also listens on loopback only. Not so an srun
# typed on this machine where `hostname` resolves to a LAN address: it listens there and
# slurmd, answering to the address it was reached from (127.0.0.1), cannot reach it; use
# sbatch, or `unshare --uts sh -c 'hostname localhost; srun ...'`.
# Where a UTS namespace cannot be made (unshare needs CAP_SYS_ADMIN, which e.g. Docker's
# default root lacks), nothing makes SLURM 22.05 bind to loopback short of renaming the
# machine or changing what its name resolves to: the daemons then bind to (and are reached
# at) the address `hostname` resolves to, and `start` warns that this is not loopback.
#
#   slurm/dev-cluster.sh max-array N
#                                  set the running cluster's MaxArraySize (slurm.conf, then a
#                                  restart of slurmctld, which keeps running and queued jobs;
#                                  see cmd_max_array); prints the previous value, to set it
#                                  back with.
#
# Two nodes (start-netns): slurmctld in one network namespace, two slurmd in one each, every
# daemon in a UTS namespace named as its node (ctl, node1, node2), so `hostname` in a job, and
# socket.gethostname() in a trial, say which node ran it. A bridge inside the controller's
# namespace joins them on DEV_SLURM_NETNS_SUBNET.0/24 (default 10.217.0), with veth pairs to the
# nodes' namespaces; no namespace has a route out, and nothing is added to this machine's own
# network namespace: the daemons listen there on nothing. Each daemon has its own mount
# namespace in which the cluster's hosts file is bind-mounted over /etc/hosts (node names ->
# namespace addresses); /etc stays as it is. munged is shared with the one-node cluster (a unix
# socket, reached from every network namespace) or started if none runs; no slurmdbd (no
# sacct). Client commands run in the controller's namespace with the cluster's slurm.conf:
#   . DIR/cluster.env; nsenter --net=/run/netns/$DEV_SLURM_CTL_NETNS env SLURM_CONF=$SLURM_CONF sbatch ...
#
# Environment: DEV_SLURM_MEM_MB (RealMemory, default: 3/4 of RAM), DEV_SLURM_CPUS (default nproc),
# DEV_SLURM_WAIT_S (how long `start` waits for the node to be idle, default 60),
# DEV_SLURM_MAX_ARRAY (MaxArraySize written by `start`, default 100001), DEV_SLURM_STATE (the
# --state FILE).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
SPOOL_CTLD=/var/spool/slurmctld
SPOOL_D=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
STATES=$RUN_DIR/states  # the --state files of the clusters running (see cmd_max_array)
# The node's name and the name the daemons see as their hostname: it resolves to 127.0.0.1
# on every system, unlike `hostname`.
NODE=localhost
WAIT_S=${DEV_SLURM_WAIT_S:-60}
# MaxArraySize: array indices run 0..MAX_ARRAY-1, so one array holds at most MAX_ARRAY tasks.
MAX_ARRAY=${DEV_SLURM_MAX_ARRAY:-100001}
STATE=${DEV_SLURM_STATE:-}
UTS=0  # 1: the daemons run in a UTS namespace named $NODE (decided by check_uts)
ADDR=127.0.0.1  # where the daemons listen and are reached (check_uts)

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

# What both clusters' slurm.conf say.
conf_common() { # cpus mem_mb
    cat <<EOF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, every job would get the whole node's memory and run alone.
DefMemPerCPU=$(($2 / $1))
# Bind to the address of each daemon's hostname instead of 0.0.0.0; slurmctld reads only
# NoCtldInAddrAny, the others NoInAddrAny (see the top of the script).
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
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
SlurmctldDebug=info
SlurmdDebug=info
EOF
}

write_conf() {
    local cpus mem_mb
    cpus=${DEV_SLURM_CPUS:-$(nproc)}
    mem_mb=${DEV_SLURM_MEM_MB:-$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 3 / 4}' /proc/meminfo)}
    mkdir -p "$CONF_DIR" "$SPOOL_CTLD" "$SPOOL_D" "$LOG_DIR" "$RUN_DIR"
    chmod 755 "$SPOOL_CTLD" "$SPOOL_D"
    {
        cat <<EOF
# Written by slurm/dev-cluster.sh: a one-node development cluster.
ClusterName=dev
SlurmctldHost=$NODE($ADDR)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$ADDR
AccountingStoragePort=6819
# (CommunicationParameters below: the daemons bind to $ADDR, the address of their hostname $NODE.)
StateSaveLocation=$SPOOL_CTLD
SlurmdSpoolDir=$SPOOL_D
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
MaxArraySize=$MAX_ARRAY
MaxJobCount=200000
NodeName=$NODE NodeAddr=$ADDR NodeHostname=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
        conf_common "$cpus" "$mem_mb"
    } >"$CONF.tmp"
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

# A daemon runs when its pid file names a live process of that name: a stale pid file whose
# pid now belongs to another process does not count.
daemon_pid() { # name pidfile -> its pid, or fails
    local pid comm
    [[ -s $2 ]] || return 1
    pid=$(<"$2")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$1" ]] || return 1
    echo "$pid"
}

running() { daemon_pid "$1" "$2" >/dev/null; }

# Start time in clock ticks after boot (field 22 of /proc/PID/stat): with the pid, it names
# one process for good; a later process given the same pid has another start time.
proc_start() { # pid
    local stat f
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    read -r -a f <<<"${stat##*) }"  # the fields after "pid (comm) ", from field 3 on
    echo "${f[19]}"
}

same_proc() { # pid starttime: still that process?
    [[ -n $2 && "$(proc_start "$1")" == "$2" ]]
}

# Wait for the pid file of a daemon this call launched, and note the daemon in $STATE: the
# fixture stops what it started, and only that.
started() { # name pidfile [node]: a slurmd's line also names its node
    local pid="" start=""
    for _ in $(seq 100); do
        pid=$(daemon_pid "$1" "$2") && break
        sleep 0.1
    done
    start=$(proc_start "${pid:-0}") || { log "$1 did not come up (no live pid in $2); see $LOG_DIR"; exit 1; }
    log "started $1 ($pid)${3:+ for $3}"
    if [[ -n $STATE ]]; then
        echo "$1 $pid $start${3:+ $3}" >>"$STATE"
        grep -qxF "$STATE" "$STATES" 2>/dev/null || echo "$STATE" >>"$STATES"
    fi
}

# Whether slurmctld, slurmdbd and slurmd can run with $NODE as their hostname (see the top).
check_uts() {
    # shellcheck disable=SC2016  # $0 is expanded by the inner sh
    if unshare --uts sh -c 'hostname "$0"' "$NODE" 2>/dev/null; then
        UTS=1
        return 0
    fi
    UTS=0
    ADDR=$(getent ahostsv4 "$(hostname)" | awk 'NR == 1 {print $1}')
    if [[ -z $ADDR ]]; then
        log "no UTS namespace (unshare --uts needs CAP_SYS_ADMIN) and this machine's hostname" \
            "$(hostname) has no IPv4 address: SLURM's daemons could not bind"
        exit 1
    fi
    if [[ $ADDR != 127.* ]]; then
        log "WARNING: no UTS namespace (unshare --uts needs CAP_SYS_ADMIN): slurmctld, slurmd and" \
            "slurmdbd will listen on $ADDR, the address of this machine's hostname $(hostname), not on loopback"
    fi
}

# Daemons are launched with fd 9 closed: it holds the lock (see `lock`), which a daemon
# would otherwise keep for as long as it runs.
as_node() { # command...: run it with $NODE as its hostname, where possible
    if [[ $UTS -eq 1 ]]; then
        # shellcheck disable=SC2016  # expanded by the inner sh
        unshare --uts sh -c 'hostname "$0" && exec "$@"' "$NODE" "$@" 9>&-
    else
        "$@" 9>&-
    fi
}

munge_works() { munge -n </dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    local pidfile=/run/munge/munged.pid
    if running munged $pidfile; then
        for _ in $(seq 50); do munge_works && return 0; sleep 0.1; done
        log "munged ($(<$pidfile)) runs but munge -n | unmunge fails"; exit 1
    fi
    ensure_munge_key
    rm -f $pidfile
    local user=root
    id munge >/dev/null 2>&1 && user=munge
    if [[ $user == root ]]; then
        munged --force 9>&-
    else
        runuser -u munge -- munged 9>&-
    fi
    started munged $pidfile
    for _ in $(seq 50); do munge_works && return 0; sleep 0.1; done
    log "munged did not come up"; exit 1
}

write_dbd_conf() {
    local conf=$CONF_DIR/slurmdbd.conf
    cat >"$conf.tmp" <<EOF
# Written by slurm/dev-cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=$ADDR
DbdPort=6819
# DbdAddr is where slurmctld connects, not what slurmdbd binds: slurmdbd binds to 0.0.0.0
# unless its own CommunicationParameters (not slurm.conf's) says NoInAddrAny.
CommunicationParameters=NoInAddrAny
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
    local sock=/run/mysqld/mysqld.sock pidfile=/run/mysqld/mysqld.pid
    if running mariadbd $pidfile && mariadb-admin --socket=$sock ping >/dev/null 2>&1; then
        return 0
    fi
    mkdir -p /run/mysqld
    chown mysql:mysql /run/mysqld
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    fi
    rm -f $pidfile
    # --skip-networking: the unix socket only; nothing listens on TCP.
    (setsid mariadbd --user=mysql --skip-networking --socket=$sock \
        --pid-file=$pidfile --innodb-buffer-pool-size=64M \
        >>$LOG_DIR/mariadb.log 2>&1 </dev/null 9>&- &)
    started mariadbd $pidfile
    for _ in $(seq 100); do
        mariadb-admin --socket=$sock ping >/dev/null 2>&1 && break
        sleep 0.2
    done
    mariadb --socket=$sock -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db" ||
        { log "mariadb did not come up; see $LOG_DIR/mariadb.log"; exit 1; }
}

start_slurmdbd() {
    if ! running slurmdbd $RUN_DIR/slurmdbd.pid; then
        rm -f $RUN_DIR/slurmdbd.pid
        as_node slurmdbd
        started slurmdbd $RUN_DIR/slurmdbd.pid
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
    if [[ -n $STATE ]]; then : >>"$STATE"; fi
    if running slurmctld $RUN_DIR/slurmctld.pid && running slurmd $RUN_DIR/slurmd.pid &&
        running slurmdbd $RUN_DIR/slurmdbd.pid &&
        [[ $(node_state) =~ ^(idle|mix|alloc)$ ]]; then
        log "already running"
        return 0
    fi
    check_uts
    write_conf
    write_dbd_conf
    start_munge
    start_mariadb
    start_slurmdbd
    if ! running slurmctld $RUN_DIR/slurmctld.pid; then
        rm -f $RUN_DIR/slurmctld.pid
        # -c would wipe queued jobs; keep state so a restart loses nothing (ReturnToService=2).
        as_node slurmctld
        started slurmctld $RUN_DIR/slurmctld.pid
    fi
    for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
    if ! running slurmd $RUN_DIR/slurmd.pid; then
        rm -f $RUN_DIR/slurmd.pid
        as_node slurmd -N "$NODE"
        started slurmd $RUN_DIR/slurmd.pid
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
    log "node $NODE not idle after ${WAIT_S}s (state '$state'); see $LOG_DIR" \
        "(a slurmctld already running with another slurm.conf? \`$0 stop\`, then start)"
    tail -n 20 $LOG_DIR/slurmctld.log $LOG_DIR/slurmd.log >&2 || true
    exit 1
}

stop_pid() { # pid starttime name: SIGTERM, then SIGKILL after 10 s
    local pid=$1 start=$2 name=$3
    same_proc "$pid" "$start" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        same_proc "$pid" "$start" || { log "stopped $name ($pid)"; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        same_proc "$pid" "$start" || { log "killed $name ($pid): SIGTERM did not stop it in 10 s"; return 0; }
        sleep 0.1
    done
    log "could not stop $name ($pid)"
    return 1
}

children() { # pid -> the pids whose parent it is (from /proc: procps may not be installed)
    local f stat fields c
    for f in /proc/[0-9]*/stat; do
        { read -r stat <"$f"; } 2>/dev/null || continue
        read -r -a fields <<<"${stat##*) }"
        c=${f#/proc/}
        if [[ ${fields[1]} == "$1" ]]; then echo "${c%/stat}"; fi
    done
}

descendants() { # pid -> "pid starttime comm" of each process below it, now
    local queue=("$1") p c start
    while [[ ${#queue[@]} -gt 0 ]]; do
        p=${queue[0]}
        queue=("${queue[@]:1}")
        for c in $(children "$p"); do
            start=$(proc_start "$c") || continue  # gone already
            echo "$c $start $(cat "/proc/$c/comm" 2>/dev/null)"
            queue+=("$c")
        done
    done
}

# slurmd double-forks each job's slurmstepd, which is then no child of it; but only one slurmd
# (port 6818) can run in a network namespace at a time, so a slurmstepd that started after our
# slurmd, in its network namespace, is one our slurmd started (a slurmd of the two-node
# cluster runs in a namespace of its own: its jobs' steps are not the one-node cluster's).
steps_since() { # starttime netns -> "pid starttime comm" of those slurmstepd and what runs below them
    local f comm pid start
    for f in /proc/[0-9]*/comm; do
        { read -r comm <"$f"; } 2>/dev/null || continue
        [[ $comm == slurmstepd ]] || continue
        pid=${f#/proc/}
        pid=${pid%/comm}
        start=$(proc_start "$pid") || continue
        [[ $start -ge $1 ]] || continue
        [[ "$(readlink "/proc/$pid/ns/net" 2>/dev/null)" == "$2" ]] || continue
        echo "$pid $start slurmstepd"
        descendants "$pid"
    done
}

# The client commands of the cluster being stopped: the one-node cluster's as they are, the
# two-node cluster's inside its controller's network namespace, with its slurm.conf (the
# state file's "client NETNS CONF" line).
CLIENT=()
sl() { "${CLIENT[@]}" "$@"; }

# Jobs still running on our slurmd (a test that failed half-way): scancel them while
# slurmctld and slurmd are up, so SLURM ends them, with the node drained so that no pending
# job starts in their place (`start` resumes a drained node).
cancel_jobs_of() { # slurmd's starttime, netns, node
    local line pid start name cmd jobs=() steps=() alive
    mapfile -t steps < <(steps_since "$1" "$2")
    for line in "${steps[@]}"; do
        read -r pid _ name <<<"$line"
        [[ $name == slurmstepd ]] || continue
        cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || continue
        if [[ $cmd =~ \[([0-9]+)\. ]]; then jobs+=("${BASH_REMATCH[1]}"); fi
    done
    [[ ${#jobs[@]} -gt 0 ]] || return 0
    # scancel takes an array task by its array name (12_3), not by its own job id (13).
    local names=()
    mapfile -t names < <(sl squeue -h -o '%A %i' 2>/dev/null |
        awk -v want=" ${jobs[*]} " 'index(want, " " $1 " ") {print $2}' | sort -u)
    [[ ${#names[@]} -gt 0 ]] || return 0
    log "cancelling the job(s) still running on our slurmd: ${names[*]}"
    sl scontrol update NodeName="$3" State=DRAIN Reason="dev-cluster.sh stop" >/dev/null 2>&1 || true
    sl scancel "${names[@]}" 2>/dev/null || true
    for _ in $(seq 100); do
        alive=0
        for line in "${steps[@]}"; do
            read -r pid start _ <<<"$line"
            if same_proc "$pid" "$start"; then alive=1; break; fi
        done
        [[ $alive -eq 1 ]] || return 0
        sleep 0.1
    done
}

# Stop exactly what one `start` or `start-netns` recorded in $STATE, newest first, by pid and
# start time; then delete the network namespaces and the directory it created.
cmd_stop_recorded() {
    need_root
    if [[ -f $STATES ]]; then
        grep -vxF "$STATE" "$STATES" >"$STATES.tmp" || true
        mv "$STATES.tmp" "$STATES"
    fi
    if [[ ! -s $STATE ]]; then
        log "$STATE lists no daemon: nothing to stop"
        return 0
    fi
    local line name pid start node ns rc=0 lines=() kids=() slurmds=()
    mapfile -t lines < <(tac "$STATE")
    for line in "${lines[@]}"; do
        read -r name pid start node <<<"$line"
        if [[ $name == client ]]; then CLIENT=(nsenter "--net=/run/netns/$pid" env "SLURM_CONF=$start"); fi
    done
    for line in "${lines[@]}"; do
        read -r name pid start node <<<"$line"
        if [[ $name == slurmd ]] && same_proc "$pid" "$start"; then
            ns=$(readlink "/proc/$pid/ns/net")
            slurmds+=("$start $ns")
            cancel_jobs_of "$start" "$ns" "${node:-$NODE}"
        fi
    done
    for line in "${lines[@]}"; do
        read -r name pid start node <<<"$line"
        case $name in client | netns | dir) continue ;; esac
        if ! same_proc "$pid" "$start"; then
            log "$name ($pid) is gone already"
            continue
        fi
        # Its children (slurmctld's slurmscriptd) by id now, before they are reparented.
        mapfile -t -O "${#kids[@]}" kids < <(descendants "$pid")
        stop_pid "$pid" "$start" "$name" || rc=1
    done
    # What is left of jobs our slurmds started (none, unless scancel could not end them).
    for line in "${slurmds[@]}"; do
        read -r start ns <<<"$line"
        mapfile -t -O "${#kids[@]}" kids < <(steps_since "$start" "$ns")
    done
    for line in "${kids[@]}"; do
        read -r pid start name <<<"$line"
        stop_pid "$pid" "$start" "$name" || rc=1
    done
    # Nothing runs in them now: deleting a namespace deletes its bridge and veth ends.
    for line in "${lines[@]}"; do
        read -r name pid _ <<<"$line"
        if [[ $name == netns ]] && [[ -e /run/netns/$pid ]]; then
            if ip netns del "$pid"; then log "deleted network namespace $pid"; else rc=1; fi
        elif [[ $name == dir && -f $pid/cluster.env ]]; then
            rm -rf "$pid" && log "removed $pid"
        fi
    done
    return $rc
}

stop_pidfile() { # name pidfile
    local pid
    if pid=$(daemon_pid "$1" "$2"); then
        stop_pid "$pid" "$(proc_start "$pid")" "$1"
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
        if running "${d%%:*}" "${d#*:}"; then echo "${d%%:*}: running ($(cat "${d#*:}"))"; else echo "${d%%:*}: stopped"; rc=3; fi
    done
    if command -v sinfo >/dev/null; then sinfo 2>&1 || rc=3; fi
    return $rc
}

# Start and stop one at a time: two test sessions may start (and stop) at once.
lock() {
    need_root
    mkdir -p "$RUN_DIR"
    exec 9>"$RUN_DIR/dev-cluster.lock"
    flock 9
}

# -- two nodes in network namespaces --------------------------------------------------------

NS_SUBNET=${DEV_SLURM_NETNS_SUBNET:-10.217.0}  # a /24 that exists only inside the namespaces
NS_HOSTS=""  # the namespaces' /etc/hosts

in_ns() { # netns hostname command...: run it in that network namespace, named hostname, with
    # $NS_HOSTS as its /etc/hosts. nsenter and not `ip netns exec`, which remounts /sys and so
    # hides /sys/fs/cgroup, without which slurmd 22.05 does not start; the mount namespace
    # (unshare --mount: private propagation) keeps the bind mount of /etc/hosts to itself.
    local ns=$1 host=$2
    shift 2
    # shellcheck disable=SC2016  # expanded by the inner sh
    nsenter "--net=/run/netns/$ns" unshare --mount --uts \
        sh -c 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"' "$NS_HOSTS" "$host" "$@" 9>&-
}

write_conf_netns() { # dir
    local dir=$1 cpus mem_mb
    cpus=${DEV_SLURM_CPUS:-$(nproc)}
    mem_mb=${DEV_SLURM_MEM_MB:-$(awk '/MemTotal/ {printf "%d", $2 / 1024 / 4}' /proc/meminfo)}
    {
        cat <<EOF
# Written by slurm/dev-cluster.sh start-netns: two nodes, each in its own network and UTS
# namespace, and the controller in a third; they reach each other through a bridge inside the
# controller's namespace, on $NS_SUBNET.0/24, which no other namespace has a route to.
ClusterName=dev2
SlurmctldHost=ctl($NS_SUBNET.1)
# No slurmdbd: scontrol show job knows a job for MinJobAge seconds after it ended.
AccountingStorageType=accounting_storage/none
# Both nodes share this machine's CPUs and memory: the configured sizes win over the hardware's.
SlurmdParameters=config_overrides
# Job ids apart from the one-node cluster's: a job's /tmp/qshield-ray-<id> (slurm/run.sh) names one job.
FirstJobId=1000000
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
NodeName=node1 NodeAddr=$NS_SUBNET.2 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
NodeName=node2 NodeAddr=$NS_SUBNET.3 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
        conf_common "$cpus" "$mem_mb"
    } >"$dir/slurm.conf"
    chmod 644 "$dir/slurm.conf"
}

cmd_start_netns() {
    need_root
    [[ -n $STATE ]] || { log "start-netns needs --state FILE (what 'stop --state FILE' undoes)"; exit 2; }
    have_binaries || cmd_install
    local c
    for c in ip nsenter unshare mount; do
        command -v $c >/dev/null || { log "$c is not installed (iproute2 / util-linux)"; exit 77; }
    done
    : >>"$STATE"
    local dir=${NETNS_DIR:-} tag ctl n1 n2 conf i ns state="" err
    if [[ -z $dir ]]; then
        dir=$(mktemp -d /tmp/qshield-slurm2-XXXXXX)
        echo "dir $dir" >>"$STATE"
    fi
    mkdir -p "$dir"/{ctld,spool/node1,spool/node2,run,log}
    conf=$dir/slurm.conf
    NS_HOSTS=$dir/hosts
    printf '127.0.0.1 localhost\n::1 localhost\n%s.1 ctl\n%s.2 node1\n%s.3 node2\n' \
        "$NS_SUBNET" "$NS_SUBNET" "$NS_SUBNET" >"$NS_HOSTS"
    chmod 644 "$NS_HOSTS"
    # Names no namespace has yet (a stale one from a crashed run is left alone).
    for _ in $(seq 20); do
        tag=$(printf '%x%x' $$ $RANDOM)
        [[ -e /run/netns/qsc-$tag || -e /run/netns/qs1-$tag || -e /run/netns/qs2-$tag ]] || break
    done
    ctl=qsc-$tag n1=qs1-$tag n2=qs2-$tag
    for ns in "$ctl" "$n1" "$n2"; do
        if ! err=$(ip netns add "$ns" 2>&1); then
            log "cannot create a network namespace here (ip netns add: $err)"
            exit 77
        fi
        echo "netns $ns" >>"$STATE"
        ip -n "$ns" link set lo up
    done
    ip -n "$ctl" link add br0 type bridge
    ip -n "$ctl" addr add "$NS_SUBNET.1/24" dev br0
    ip -n "$ctl" link set br0 up
    i=1
    for ns in "$n1" "$n2"; do
        ip -n "$ctl" link add "v$i" type veth peer name eth0 netns "$ns"
        ip -n "$ctl" link set "v$i" master br0 up
        ip -n "$ns" addr add "$NS_SUBNET.$((i + 1))/24" dev eth0
        ip -n "$ns" link set eth0 up
        i=$((i + 1))
    done
    write_conf_netns "$dir"
    echo "client $ctl $conf" >>"$STATE"
    CLIENT=(nsenter "--net=/run/netns/$ctl" env "SLURM_CONF=$conf")
    start_munge  # the one-node cluster's, if it runs: munged is reached by a unix socket
    in_ns "$ctl" ctl env "SLURM_CONF=$conf" slurmctld -f "$conf"
    started slurmctld "$dir/run/slurmctld.pid"
    for _ in $(seq 50); do sl scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
    in_ns "$n1" node1 env "SLURM_CONF=$conf" slurmd -f "$conf"
    started slurmd "$dir/run/slurmd-node1.pid" node1
    in_ns "$n2" node2 env "SLURM_CONF=$conf" slurmd -f "$conf"
    started slurmd "$dir/run/slurmd-node2.pid" node2
    cat >"$dir/cluster.env" <<EOF
SLURM_CONF=$conf
DEV_SLURM_CTL_NETNS=$ctl
DEV_SLURM_NODE_NETNS="$n1 $n2"
DEV_SLURM_NODES="node1 node2"
DEV_SLURM_SUBNET=$NS_SUBNET.0/24
EOF
    for _ in $(seq $((WAIT_S * 2))); do
        state=$(sl sinfo -h -N -o '%t' 2>/dev/null | tr -d '*~#!%$@^-' | sort -u | tr '\n' ' ')
        if [[ $state == "idle " ]]; then
            log "nodes node1 ($n1, $NS_SUBNET.2) and node2 ($n2, $NS_SUBNET.3) are idle; controller in $ctl ($NS_SUBNET.1)"
            echo "$dir"
            return 0
        fi
        sleep 0.5
    done
    log "the two nodes are not idle after ${WAIT_S}s (states: $state); see $dir/log"
    tail -n 20 "$dir"/log/*.log >&2 || true
    exit 1
}

# MaxArraySize needs a restart of slurmctld: `scontrol reconfigure` updates what `scontrol show
# config` reports, but slurmctld 22.05 keeps the limit it validates arrays with in a static
# variable set on the first array it sees (job_mgr.c, max_array_size), so after a reconfigure
# it still accepts and refuses by the old value. A restart keeps queued and running jobs
# (StateSaveLocation; slurmd keeps running); the new slurmctld takes the old one's line in the
# state file of whoever started it (the STATES registry), so `stop --state` still stops it.
cmd_max_array() { # N
    need_root
    [[ $1 =~ ^[0-9]+$ ]] || usage
    local old pid start new_pid new_start f
    old=$(scontrol show config 2>/dev/null | awk '$1 == "MaxArraySize" {print $3}')
    [[ -n $old ]] || { log "no running cluster (scontrol show config failed)"; exit 1; }
    pid=$(daemon_pid slurmctld $RUN_DIR/slurmctld.pid) || { log "no slurmctld of this script runs"; exit 1; }
    start=$(proc_start "$pid")
    sed -i "s/^MaxArraySize=.*/MaxArraySize=$1/" "$CONF"
    grep -qx "MaxArraySize=$1" "$CONF" || { log "$CONF has no MaxArraySize line"; exit 1; }
    check_uts
    stop_pid "$pid" "$start" slurmctld
    rm -f $RUN_DIR/slurmctld.pid
    STATE="" as_node slurmctld
    STATE="" started slurmctld $RUN_DIR/slurmctld.pid
    new_pid=$(daemon_pid slurmctld $RUN_DIR/slurmctld.pid)
    new_start=$(proc_start "$new_pid")
    if [[ -f $STATES ]]; then
        while read -r f; do
            [[ -f $f ]] && sed -i "s/^slurmctld $pid $start\$/slurmctld $new_pid $new_start/" "$f"
        done <"$STATES"
    fi
    for _ in $(seq 100); do
        if [[ $(scontrol show config 2>/dev/null | awk '$1 == "MaxArraySize" {print $3}') == "$1" ]] &&
            [[ $(node_state) =~ ^(idle|mix|alloc)$ ]]; then
            log "MaxArraySize $old -> $1 (slurmctld restarted: $pid -> $new_pid)"
            echo "$old"
            return 0
        fi
        sleep 0.2
    done
    log "slurmctld did not come back with MaxArraySize=$1; see $LOG_DIR"
    exit 1
}

usage() {
    echo "usage: $0 {install|start [--state FILE]|start-netns --state FILE [--dir DIR]|stop [--state FILE]|status|max-array N}" >&2
    exit 2
}

cmd=${1:-}
[[ $# -gt 0 ]] && shift
if [[ $cmd == max-array ]]; then
    [[ $# -eq 1 ]] || usage
    lock
    cmd_max_array "$1"
    exit 0
fi
while [[ $# -gt 0 ]]; do
    case $1 in
        --state) [[ $# -ge 2 ]] || usage; STATE=$2; shift 2 ;;
        --state=*) STATE=${1#--state=}; shift ;;
        --dir) [[ $# -ge 2 && $cmd == start-netns ]] || usage; NETNS_DIR=$2; shift 2 ;;
        *) usage ;;
    esac
done
case $cmd in
    install) cmd_install ;;
    start) lock; cmd_start ;;
    start-netns) lock; cmd_start_netns ;;
    stop) lock; if [[ -n $STATE ]]; then cmd_stop_recorded; else cmd_stop; fi ;;
    status) cmd_status ;;
    *) usage ;;
esac
