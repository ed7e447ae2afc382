#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests and for trying the Slurm path on a workstation:
#   sudo bash etc/local_slurm.sh up      # install (if missing), configure and start; a no-op when already up
#   sudo bash etc/local_slurm.sh down    # stop exactly the daemons `up` started
#   bash etc/local_slurm.sh status       # exit 0 when the node is usable; 1 when it is down, drained,
#                                        # not responding or powered off, or no cluster answers
# Debian/Ubuntu only (apt-get), as root. Nothing in the project depends on it: on a real cluster, use that.
# It writes /etc/slurm/slurm.conf (refusing to replace one it did not write), creates a munge key if
# there is none, starts munged, slurmctld and slurmd directly (no systemd needed) and waits until
# `sinfo` shows the node idle. What it started is recorded in $STATE (pid files), which `down` reads.
set -euo pipefail

STATE=${LOCAL_SLURM_STATE:-/run/local_slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by etc/local_slurm.sh"
LOGS=/var/log/slurm
MUNGE_PID=/run/munge/munged.pid
SPOOL=/var/lib/slurm
PARTITION=local
POLICY_DIR=${LOCAL_SLURM_POLICY_DIR:-/usr/sbin}  # where policy-rc.d goes (the tests use a scratch folder)

say() { echo "local_slurm: $*"; }
die() { echo "local_slurm: error: $*" >&2; exit 1; }

node_state() { sinfo --noheader --nodes="$(hostname -s)" --format=%T 2>/dev/null | head -1; }

# Whether a node state (sinfo's %T) can run jobs: exactly idle, mixed, allocated or completing. sinfo marks
# a node whose slurmd does not answer with a suffix (`idle*`: not responding; `~` powered off, `#` powering
# up, `%` powering down, `!` power down pending, `@` reboot pending, `^` rebooting): none of those can.
usable() { case "$1" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac; }

POLICY_OURS=()  # the policy-rc.d that install_packages wrote, if any
remove_policy() { [ ${#POLICY_OURS[@]} -eq 0 ] || rm -f "${POLICY_OURS[@]}"; POLICY_OURS=(); }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && return 0
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed, and there is no apt-get to install them"
    say "installing slurm-wlm and munge with apt-get"
    local started=$SECONDS
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # policy-rc.d 101: the packages' scripts must not start daemons of their own, with another config.
    # Removed however this ends: a failed apt-get (set -e exits) or a Ctrl-C must not leave behind a policy
    # that would keep every later package from starting its service. A policy of the system's own stays.
    trap remove_policy EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    if [ ! -e "$POLICY_DIR/policy-rc.d" ]; then
        POLICY_OURS=("$POLICY_DIR/policy-rc.d")
        printf '#!/bin/sh\nexit 101\n' >"$POLICY_DIR/policy-rc.d"
        chmod +x "$POLICY_DIR/policy-rc.d"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    remove_policy
    trap - EXIT INT TERM
    say "installed in $((SECONDS - started)) s"
}

write_config() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; this machine has a Slurm of its own"
    fi
    local host cpus memory
    host=$(hostname -s)
    cpus=$(nproc)
    memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))  # MB; 10 % for the system
    mkdir -p /etc/slurm "$LOGS" "$SPOOL/slurmctld" "$SPOOL/slurmd" "$STATE"
    # Jobs may share cores (OverSubscribe=FORCE:4): the tests' jobs are tiny runs that mostly wait, and
    # a one-node cluster of 2 cores would otherwise run 2 at a time. Memory is not a consumable (CR_Core).
    # JobRequeue=1: batch jobs are requeued after a node failure, and `scontrol requeue` works for all.
    # EnforcePartLimits=ALL: a job this node can never run (more CPUs than it has) is refused by sbatch, as
    # on most clusters, instead of pending forever (reason PartitionConfig).
    # 127.0.0.1: the daemons find each other where the host's name does not resolve (a fresh container).
    cat >"$CONF.tmp" <<EOF
$MARK on $(date -u +%FT%TZ); \`bash etc/local_slurm.sh down\` leaves it, \`up\` rewrites it
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobRequeue=1
EnforcePartLimits=ALL
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=$SPOOL/slurmctld
SlurmdSpoolDir=$SPOOL/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    mv "$CONF.tmp" "$CONF"
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # a munged is already serving (the system's, or ours from before): leave it be
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    local user=root
    id munge >/dev/null 2>&1 && user=munge
    chown "$user" /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown "$user" /run/munge /var/lib/munge /var/log/munge
    if [ "$user" = munge ]; then  # munged refuses a key that its own user does not own
        su -s /bin/sh munge -c "munged --pid-file=$MUNGE_PID" || die "munged did not start"
    else
        munged --force --pid-file="$MUNGE_PID" || die "munged did not start"
    fi
    echo munged >>"$STATE/started"
}

running() {  # name: whether the pid file our slurm.conf gives it names a live process
    [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null
}

start_daemon() {  # name, then its command line; skipped when it runs already
    local name=$1
    shift
    running "$name" && return 0
    "$@" || die "$name did not start (see $LOGS/$name.log)"
    echo "$name" >>"$STATE/started"
}

wait_idle() {
    local state
    for _ in $(seq 1 120); do
        state=$(node_state || true)
        usable "$state" && return 0
        case "$state" in
            down*|drain*) scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    die "the node is not idle after 60 s (sinfo says '${state:-nothing}'; see $LOGS/slurmctld.log and slurmd.log)"
}

up() {
    [ "$(id -u)" -eq 0 ] || die "run it as root (sudo bash etc/local_slurm.sh up): it installs packages and starts daemons"
    local started=$SECONDS
    install_packages
    # sinfo only when our slurmctld runs: without a controller it takes 9 s to give up
    if [ -f "$CONF" ] && grep -qF "$MARK" "$CONF" && running slurmctld; then
        usable "$(node_state || true)" && { say "already up"; return 0; }
    fi
    mkdir -p "$STATE"
    write_config
    start_munge
    start_daemon slurmctld slurmctld
    start_daemon slurmd slurmd
    wait_idle
    say "up in $((SECONDS - started)) s: partition '$PARTITION', node $(hostname -s) ($(nproc) CPUs); try: srun hostname"
}

stop_pid() {  # name, pid file: TERM the process it names, wait for it to exit
    local file=$2 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && die "$1 ($pid) did not stop"
    fi
    rm -f "$file"
}

down() {
    [ -f "$STATE/started" ] || { say "nothing started by this script is running"; return 0; }
    for name in slurmd slurmctld munged; do  # the reverse of the start order
        grep -qx "$name" "$STATE/started" || continue
        if [ "$name" = munged ]; then stop_pid munged "$MUNGE_PID"; else stop_pid "$name" "$STATE/$name.pid"; fi
    done
    rm -f "$STATE/started"
    say "down"
}

status() {  # exit 0 only when the node can run jobs
    local state
    state=$(node_state || true)
    [ -n "$state" ] || { say "no cluster answers"; exit 1; }
    usable "$state" && { say "node $(hostname -s) is $state"; exit 0; }
    say "node $(hostname -s) is $state: not usable (down, drained, not responding or powered off; see $LOGS/slurmd.log)"
    exit 1
}

# Sourced (as the tests do), it only defines its functions.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: bash etc/local_slurm.sh up|down|status" >&2; exit 2 ;;
esac
