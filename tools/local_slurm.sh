#!/usr/bin/env bash
# A SLURM cluster on this one host, for testing launch/slurm_multinode.sbatch (tests/test_slurm.py).
#
#   sudo tools/local_slurm.sh              # install (if needed), configure, start; wait until the node is idle
#   sudo tools/local_slurm.sh --nodes 2    # the same with 2 simulated nodes (multi-node runs on one host)
#   sudo tools/local_slurm.sh --stop       # stop the daemons (packages and files stay)
#
# Debian/Ubuntu only (tested with Debian 12's SLURM 22.05). Run as root. Running it again is
# fine: it only does what is missing, and restarts the SLURM daemons only when the
# configuration it writes has changed.
#
# What it changes on this machine:
#   - apt installs slurmctld, slurmd, slurm-client and munge (--no-install-recommends) when
#     they are missing, without starting or enabling their services;
#   - writes /etc/slurm/slurm.conf (and /etc/slurm/cgroup.conf with LOCAL_SLURM_PROCTRACK=cgroup);
#     a slurm.conf that this script did not write is left alone and the script stops;
#   - creates /etc/munge/munge.key if the munge package did not;
#   - with --nodes N > 1: adds the node names <host>-1 .. <host>-N to /etc/hosts (127.0.0.1),
#     so that they resolve like real node names;
#   - starts munged (as user munge), slurmctld (as user slurm) and one slurmd per node (as
#     root) directly, without systemd; logs in /var/log/slurm/, state in /var/lib/slurm/.
#
# One node is this host with the CPU count and memory that `slurmd -C` reports; N simulated
# nodes share them (N slurmd daemons on their own ports; SLURM's Debian build allows this).
# The configuration is tuned for a fast test, not for production: short timeouts, a
# scheduler pass every 2 s and cred_expire=10 (a requeued job may start again 10 s after its
# requeue instead of SLURM's default 120 s). Process tracking is proctrack/linuxproc (the
# process tree), which needs no cgroup set-up and works in containers;
# LOCAL_SLURM_PROCTRACK=cgroup selects proctrack/cgroup (one node only).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARKER="# Written by titan_lrt tools/local_slurm.sh"
PACKAGES=(slurmctld slurmd slurm-client munge)
PROCTRACK="${LOCAL_SLURM_PROCTRACK:-linuxproc}"
WAIT_S="${LOCAL_SLURM_WAIT_S:-60}"

say() { echo "local_slurm: $*"; }
die() { echo "local_slurm: error: $*" >&2; exit 1; }

# pid from a pid file if that process is alive
alive_pid() {
    local pid
    [ -r "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

stop_daemon() {  # name pidfile
    local pid
    if pid=$(alive_pid "$2"); then
        say "stopping $1 (pid $pid)"
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
        die "$1 (pid $pid) did not stop within 10 s"
    fi
}

# Put `line` (or nothing) in /etc/hosts in place of the line this script added before.
set_hosts_line() {
    local line="$1"
    if [ -n "$line" ] && grep -qxF "$line" /etc/hosts; then return 0; fi
    if [ -z "$line" ] && ! grep -qF "$MARKER" /etc/hosts; then return 0; fi
    { grep -vF "$MARKER" /etc/hosts || true; [ -z "$line" ] || echo "$line"; } > /etc/hosts.local_slurm
    cat /etc/hosts.local_slurm > /etc/hosts    # rewritten in place: /etc/hosts may be a mount point
    rm -f /etc/hosts.local_slurm
    say "updated /etc/hosts: ${line:-removed the simulated node names}"
}

stop_slurm() {
    local f
    for f in /run/slurmd*.pid; do stop_daemon slurmd "$f"; done
    stop_daemon slurmctld /run/slurmctld.pid
}

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts system daemons)"

usage="usage: $0 [--nodes N | --stop]"
NODES=1
case "${1:-}" in
    "") ;;
    --stop)
        stop_slurm
        stop_daemon munged /run/munge/munged.pid
        say "stopped"
        exit 0 ;;
    --nodes)
        NODES="${2:?$usage}"
        [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "$usage" ;;
    *) die "$usage" ;;
esac

# ---- packages ------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} with apt"
    # Keep apt from starting the services (we start them below with our config).
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt-get update -qq || say "apt-get update failed; trying with the current package lists"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    [ "$made_policy" -eq 0 ] || rm -f /usr/sbin/policy-rc.d
else
    say "packages present: ${PACKAGES[*]}"
fi

# ---- slurm.conf ------------------------------------------------------------------
if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; not touching it"
fi
host=$(hostname -s)
hw=$(slurmd -C | head -n 1)       # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
case "$hw" in NodeName=*) ;; *) die "unexpected output of slurmd -C: $hw" ;; esac
if [ "$NODES" -eq 1 ]; then
    node_names=("$host")
    node_conf="$hw State=UNKNOWN"
    node_list="$host"
    set_hosts_line ""
else
    [ "$PROCTRACK" = linuxproc ] || die "--nodes > 1 needs proctrack/linuxproc"
    cpus=$(grep -o ' CPUs=[0-9]*' <<<"$hw" | cut -d= -f2)
    mem=$(grep -o ' RealMemory=[0-9]*' <<<"$hw" | cut -d= -f2)
    [ "$NODES" -le "$cpus" ] || die "--nodes $NODES: this host has only $cpus CPUs"
    node_names=()
    for i in $(seq "$NODES"); do node_names+=("$host-$i"); done
    node_list="$host-[1-$NODES]"
    node_conf="NodeName=$node_list NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))] CPUs=$((cpus / NODES)) RealMemory=$((mem / NODES)) State=UNKNOWN"
    set_hosts_line "127.0.0.1 ${node_names[*]} $MARKER"
fi
new_conf=$(cat <<EOF
$MARKER: a test cluster on this one host.
# Do not use it for anything else; rerun the script to regenerate it.
ClusterName=localtest
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
# a requeued job may start again cred_expire seconds after the requeue (default 120)
AuthInfo=cred_expire=10
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd-%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ProctrackType=proctrack/$PROCTRACK
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
MailProg=/bin/true
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
KillWait=10
MinJobAge=600
$node_conf
PartitionName=debug Nodes=$node_list Default=YES MaxTime=INFINITE State=UP
EOF
)
conf_changed=0
if [ ! -e "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
    mkdir -p /etc/slurm
    printf '%s\n' "$new_conf" > "$CONF"
    conf_changed=1
    say "wrote $CONF (${node_names[*]}: $node_conf; proctrack/$PROCTRACK)"
else
    say "$CONF is up to date"
fi
if [ "$PROCTRACK" = cgroup ] && [ ! -e /etc/slurm/cgroup.conf ]; then
    printf '%s\n' "$MARKER" "CgroupPlugin=autodetect" > /etc/slurm/cgroup.conf
    say "wrote /etc/slurm/cgroup.conf"
fi

# ---- daemons ----------------------------------------------------------------------
if [ "$conf_changed" -eq 1 ]; then
    stop_slurm    # restarted below with the new configuration
fi

if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
if pid=$(alive_pid /run/munge/munged.pid); then
    say "munged already running (pid $pid)"
else
    say "starting munged"
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
fi
munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"

install -d -o slurm -g slurm /var/log/slurm /var/lib/slurm/slurmctld
if pid=$(alive_pid /run/slurmctld.pid); then
    say "slurmctld already running (pid $pid)"
else
    say "starting slurmctld (log /var/log/slurm/slurmctld.log)"
    slurmctld
fi
for node in "${node_names[@]}"; do
    if pid=$(alive_pid "/run/slurmd-$node.pid"); then
        say "slurmd for $node already running (pid $pid)"
    else
        say "starting slurmd for $node (log /var/log/slurm/slurmd-$node.log)"
        install -d "/var/lib/slurm/slurmd-$node"
        slurmd -N "$node"
    fi
done

# ---- wait for the nodes -----------------------------------------------------------
say "waiting up to ${WAIT_S}s for ${node_names[*]} to be idle"
ready=0
for _ in $(seq $((WAIT_S * 2))); do
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
    ready=1
    for node in "${node_names[@]}"; do
        state=$(awk -v n="$node" '$1 == n {print $2}' <<<"$states")
        case "$state" in
            idle|mixed|allocated) ;;
            down*|drain*) ready=0; scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
            *) ready=0 ;;
        esac
    done
    [ "$ready" -eq 0 ] || break
    sleep 0.5
done
sinfo
[ "$ready" -eq 1 ] || die "nodes not ready after ${WAIT_S}s; see /var/log/slurm/slurmctld.log and slurmd-*.log"
say "ready: ${node_names[*]}"
