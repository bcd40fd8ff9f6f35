#!/usr/bin/env bash
# A single-node Slurm on localhost for the tests: munge + slurmctld + slurmd, no systemd.
#
#   tests/slurm/cluster.sh start    # idempotent
#   tests/slurm/cluster.sh stop     # cancels the jobs, stops what start started
#   tests/slurm/cluster.sh status
#
# Needs root and the Debian packages munge, slurmctld, slurmd and slurm-client. State, logs
# and the configuration live in $XMAS_SLURM_DIR (default /tmp/xmas-slurm). Clients find the
# cluster through a link /etc/slurm/slurm.conf -> $XMAS_SLURM_DIR/slurm.conf: SLURM_CONF
# would not do, because the Snakemake plugin clears SLURM_* variables before it calls srun
# inside a job. start refuses to replace a slurm.conf that is not its own link; stop removes it.
#
# The node declares the CPUs and memory slurmd detects on this machine, so a job that asks for
# more memory than the machine has is refused, as a real cluster would refuse it. It also poses
# as a small GPU node: it advertises $XMAS_SLURM_GPUS GPUs (default 2, backed by empty files:
# jobs are granted GPUs but see none, and torch falls back to the CPU).
set -euo pipefail

DIR=${XMAS_SLURM_DIR:-/tmp/xmas-slurm}
GPUS=${XMAS_SLURM_GPUS:-2}
NODE=$(hostname -s)
SYSTEM_CONF=/etc/slurm/slurm.conf
export SLURM_CONF=$DIR/slurm.conf  # for the daemons started here

say() { echo "slurm-cluster: $*" >&2; }
die() { say "$*"; exit 1; }

alive() {  # pid -> true while that process lives (a zombie counts as stopped)
    [[ -d /proc/$1 ]] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null
}

gone() { ! alive "$1"; }

running() {  # pid file -> true while its process lives
    [[ -s $1 ]] && alive "$(<"$1")"
}

wait_until() {  # seconds command... -> retry the command every 0.5 s until it succeeds
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    munge_works && return
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile /etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key && chmod 0600 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock  # left by an unclean stop
    runuser -u munge -- munged
    touch "$DIR/munge-started-here"
    wait_until 10 munge_works || die "munged does not answer (see /var/log/munge/munged.log)"
}

write_config() {
    # CPU layout and memory as slurmd detects them (RealMemory: the machine's memory in MB); GPUs
    # as advertised above.
    local layout
    layout=$(slurmd -C | head -1 | grep -o 'CPUs=.*RealMemory=[0-9]*')
    mkdir -p "$DIR/state" "$DIR/spool"
    cat >"$SLURM_CONF" <<EOF
ClusterName=xmas-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# no cgroups on these machines
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
MailProg=/bin/true
ReturnToService=2
# finished jobs stay visible to squeue, the status command of profiles/slurm, for an hour
MinJobAge=3600
NodeName=$NODE NodeAddr=127.0.0.1 $layout Gres=gpu:$GPUS State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # Slurm wants one distinct device file per GPU; empty files stand in for /dev/nvidia*.
    : >"$DIR/gres.conf"
    local gpu
    for ((gpu = 0; gpu < GPUS; gpu++)); do
        touch "$DIR/fake-gpu$gpu"
        echo "NodeName=$NODE Name=gpu File=$DIR/fake-gpu$gpu" >>"$DIR/gres.conf"
    done
}

link_system_config() {
    if [[ -e $SYSTEM_CONF || -L $SYSTEM_CONF ]] && [[ $(readlink "$SYSTEM_CONF") != "$SLURM_CONF" ]]; then
        die "$SYSTEM_CONF exists and is not a link to $SLURM_CONF: this machine has its own Slurm"
    fi
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -sfn "$SLURM_CONF" "$SYSTEM_CONF"
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null; }

node_ready() {
    case $(node_state) in
        idle* | mixed* | allocated* | completing*) return 0 ;;
        drain* | down* | inval* | fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    return 1
}

start() {
    [[ $(id -u) == 0 ]] || die "needs root (it starts munged, slurmctld and slurmd)"
    for tool in munged slurmctld slurmd sbatch; do
        command -v "$tool" >/dev/null || die "$tool not found: apt-get install munge slurmctld slurmd slurm-client"
    done
    mkdir -p "$DIR"
    link_system_config
    start_munge
    if ! running "$DIR/slurmctld.pid"; then
        write_config
        slurmctld -c  # -c: a fresh cluster, no jobs or node states from an earlier run
    fi
    if ! running "$DIR/slurmd.pid"; then
        slurmd -c -N "$NODE"
    fi
    wait_until 30 node_ready || die "node $NODE is '$(node_state)', not idle (see $DIR/slurmd.log, $DIR/slurmctld.log)"
    # sinfo can say idle before slurmd has registered after a restart: a real job step proves it.
    timeout 60 srun -N1 -n1 --time=1 true || die "a test job did not run (see $DIR/slurmctld.log)"
    say "node $NODE is up ($(node_state))"
}

stop_daemon() {  # name pid-file
    running "$2" || return 0
    local pid
    pid=$(<"$2")  # read first: the daemons remove their pid file before they are gone
    kill "$pid" 2>/dev/null || true
    wait_until 30 gone "$pid" || { say "$1 ignores SIGTERM, killing it"; kill -9 "$pid" 2>/dev/null || true; }
}

stop() {
    if running "$DIR/slurmctld.pid"; then
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
    fi
    stop_daemon slurmd "$DIR/slurmd.pid"
    stop_daemon slurmctld "$DIR/slurmctld.pid"
    if [[ -e $DIR/munge-started-here ]]; then
        stop_daemon munged /run/munge/munged.pid
        rm -f "$DIR/munge-started-here"
    fi
    [[ $(readlink "$SYSTEM_CONF") == "$SLURM_CONF" ]] && rm -f "$SYSTEM_CONF"
    say "stopped"
}

status() {
    running "$DIR/slurmctld.pid" && running "$DIR/slurmd.pid" || { say "not running"; return 1; }
    sinfo
}

case ${1:-} in
    start | stop | status) "$1" ;;
    *) die "usage: $0 start|stop|status" ;;
esac
