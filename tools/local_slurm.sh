#!/usr/bin/env bash
# A one-host SLURM cluster for testing launch/slurm_multinode.sbatch (tests/test_slurm.py).
#
#   sudo tools/local_slurm.sh          # install (if needed), configure, start; wait until the node is idle
#   sudo tools/local_slurm.sh --stop   # stop the daemons (packages and files stay)
#
# Debian/Ubuntu only (Debian 12's SLURM 22.05 is what it is tested with). Run as root.
# Running it again is fine: it only does what is missing, and restarts the daemons
# only when the configuration it writes has changed.
#
# What it changes on this machine:
#   - apt installs slurmctld, slurmd, slurm-client and munge (--no-install-recommends)
#     when they are missing; their services are not enabled or started by apt;
#   - writes /etc/slurm/slurm.conf (one node = this host, with the CPU count and memory
#     that `slurmd -C` reports; partition "debug"); an existing slurm.conf that this
#     script did not write is left alone and the script stops;
#   - creates /etc/munge/munge.key if the munge package did not;
#   - starts munged (as user munge), slurmctld (as user slurm) and slurmd (as root)
#     directly, without systemd; logs in /var/log/slurm/, state in /var/lib/slurm/.
#
# The configuration is tuned for a fast test, not for production: short timeouts, a
# scheduler pass every few seconds and cred_expire=10 (a requeued job may start again
# 10 s after its requeue instead of SLURM's default 120 s). Process tracking uses
# proctrack/linuxproc (the process tree), which needs no cgroup set-up and works in
# containers; LOCAL_SLURM_PROCTRACK=cgroup selects proctrack/cgroup instead.
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

stop_all() {
    stop_daemon slurmd /run/slurmd.pid
    stop_daemon slurmctld /run/slurmctld.pid
    stop_daemon munged /run/munge/munged.pid
}

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts system daemons)"

if [ "${1:-}" = "--stop" ]; then
    stop_all
    say "stopped"
    exit 0
elif [ $# -gt 0 ]; then
    die "usage: $0 [--stop]"
fi

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
node_line=$(slurmd -C | head -n 1)       # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
case "$node_line" in NodeName=*) ;; *) die "unexpected output of slurmd -C: $node_line" ;; esac
new_conf=$(cat <<EOF
$MARKER: a one-node test cluster on this host.
# Do not use it for anything else; rerun the script to regenerate it.
ClusterName=localtest
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
# a requeued job may start again cred_expire seconds after the requeue (default 120)
AuthInfo=cred_expire=10
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
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
$node_line State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
conf_changed=0
if [ ! -e "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
    mkdir -p /etc/slurm
    printf '%s\n' "$new_conf" > "$CONF"
    conf_changed=1
    say "wrote $CONF ($node_line, proctrack/$PROCTRACK)"
else
    say "$CONF is up to date"
fi
if [ "$PROCTRACK" = cgroup ] && [ ! -e /etc/slurm/cgroup.conf ]; then
    printf '%s\n' "$MARKER" "CgroupPlugin=autodetect" > /etc/slurm/cgroup.conf
    say "wrote /etc/slurm/cgroup.conf"
fi

# ---- daemons ----------------------------------------------------------------------
if [ "$conf_changed" -eq 1 ] && { alive_pid /run/slurmctld.pid >/dev/null || alive_pid /run/slurmd.pid >/dev/null; }; then
    say "configuration changed: restarting the SLURM daemons"
    stop_daemon slurmd /run/slurmd.pid
    stop_daemon slurmctld /run/slurmctld.pid
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
install -d /var/lib/slurm/slurmd
if pid=$(alive_pid /run/slurmctld.pid); then
    say "slurmctld already running (pid $pid)"
else
    say "starting slurmctld (log /var/log/slurm/slurmctld.log)"
    slurmctld
fi
if pid=$(alive_pid /run/slurmd.pid); then
    say "slurmd already running (pid $pid)"
else
    say "starting slurmd (log /var/log/slurm/slurmd.log)"
    slurmd
fi

# ---- wait for the node ------------------------------------------------------------
say "waiting up to ${WAIT_S}s for node $host to be idle"
state=""
for _ in $(seq $((WAIT_S * 2))); do
    state=$(sinfo -h -N -n "$host" -o %T 2>/dev/null | head -n 1 || true)
    case "$state" in
        idle|mixed|allocated) break ;;
        down*|drain*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
done
case "$state" in
    idle|mixed|allocated) ;;
    *) die "node $host is '${state:-unknown}' after ${WAIT_S}s; see /var/log/slurm/slurmctld.log and slurmd.log" ;;
esac
sinfo
say "ready: node $host is $state"
