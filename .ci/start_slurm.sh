#!/usr/bin/env bash
# start_slurm.sh - install and start a single-node Slurm cluster (Debian 12, no systemd).
#
# Usage:
#   start_slurm.sh [--accounting|--no-accounting]
#                             install (if needed), configure, start; wait until node is idle
#   start_slurm.sh --stop     stop slurmd, slurmctld (and slurmdbd, mariadbd), munged
#   start_slurm.sh --restart  stop, then start again (rewrites slurm.conf)
#   start_slurm.sh --status   print daemon / node state, exit 0 if healthy
#
#   --accounting     also install + start mariadb and slurmdbd, so that `sacct` works
#                    (submitit reads job states with sacct; without it job.state is UNKNOWN)
#   --no-accounting  AccountingStorageType=none (the default on a fresh machine);
#                    with neither flag, whatever the running/generated config has is kept
#
# Environment knobs (all optional):
#   SLURM_ACCOUNTING=1|0 same as --accounting / --no-accounting
#   SLURM_NODE_NAME     node name             (default: `hostname -s`, falls back to localhost)
#   SLURM_NODE_CPUS     advertise this many CPUs instead of the detected count
#                       (oversubscription for CI; enables SlurmdParameters=config_overrides)
#   SLURM_NODE_MEM_MB   advertise this much RealMemory instead of the detected value
#   SLURM_WAIT_S        seconds to wait for the node to become idle (default: 60)
#   SLURM_CLEAR_STATE=1 start slurmctld with -c (forget saved jobs/state)
#   SLURM_CRED_EXPIRE   AuthInfo=cred_expire (default 10 s; a requeued job waits this long + 1 s)
#   SLURM_GRACE_TIME    GraceTime of partition debug when preempted (default 20 s)
#
# Must run as root. Daemons are started directly (no systemctl), SlurmUser=root.
set -euo pipefail

PROG=$(basename "$0")
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
DBD_CONF=$CONF_DIR/slurmdbd.conf
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
DBD_PID=$RUN_DIR/slurmdbd.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
MYSQL_PID=/run/mysqld/mysqld.pid
MYSQL_LOG=/var/log/mysql/error.log
CLUSTER=ci
WAIT_S=${SLURM_WAIT_S:-60}
export SLURM_CONF=$CONF

log()  { printf '[%s %s] %s\n' "$PROG" "$(date +%H:%M:%S)" "$*"; }
now()  { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

dump_logs() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" "$LOG_DIR/slurmdbd.log" \
             "$MYSQL_LOG" /var/log/munge/munged.log; do
        if [[ -s $f ]]; then
            echo "----- tail -n 30 $f -----" >&2
            tail -n 30 "$f" >&2 || true
        fi
    done
}

die() {
    # one-line reason last, so that the last line of CI output shows it
    dump_logs
    echo "$PROG: FAILED: $*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || { echo "$PROG: FAILED: must run as root" >&2; exit 1; }

node_name() {
    local n=${SLURM_NODE_NAME:-}
    [[ -n $n ]] || n=$(hostname -s 2>/dev/null || true)
    [[ -n $n ]] || n=localhost
    echo "$n"
}
NODE=$(node_name)

pid_alive() {   # pid_alive PIDFILE COMM
    local pf=$1 comm=$2 pid
    [[ -s $pf ]] || return 1
    pid=$(cat "$pf" 2>/dev/null) || return 1
    [[ -n $pid && -d /proc/$pid ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]]
}
any_proc() { pgrep -x "$1" >/dev/null 2>&1; }   # exact process name
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

node_state() {  # prints e.g. idle, mixed, down*, unknown* ; empty if sinfo fails
    timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1 || true
}
healthy_state() { [[ $1 =~ ^(idle|mixed|allocated|completing)$ ]]; }

stop_proc() {   # stop_proc PIDFILE COMM
    local pf=$1 comm=$2 pids i
    pids=$(pgrep -x "$comm" || true)
    [[ -z $pids ]] && { rm -f "$pf"; return 0; }
    log "stopping $comm (pid $(echo $pids))"
    kill -TERM $pids 2>/dev/null || true
    for i in $(seq 1 100); do
        any_proc "$comm" || { rm -f "$pf"; return 0; }
        sleep 0.2
    done
    log "$comm did not exit after 20 s, sending SIGKILL"
    kill -KILL $(pgrep -x "$comm") 2>/dev/null || true
    sleep 0.5
    rm -f "$pf"
}

do_stop() {
    stop_proc "$SLURMD_PID" slurmd
    stop_proc "$CTLD_PID" slurmctld
    stop_proc "$DBD_PID" slurmdbd
    stop_proc "$MYSQL_PID" mariadbd
    stop_proc "$MUNGE_PID" munged
    log "stopped (running job steps, if any, are left to slurmstepd)"
}

conf_accounting() {  # 1 if the current slurm.conf uses slurmdbd, 0 if not, "" if no conf
    [[ -f $CONF ]] || return 0
    if grep -q '^AccountingStorageType=accounting_storage/slurmdbd' "$CONF"; then echo 1; else echo 0; fi
}

do_status() {
    local st ok=0
    pid_alive "$CTLD_PID" slurmctld && echo "slurmctld: running" || { echo "slurmctld: NOT running"; ok=1; }
    pid_alive "$SLURMD_PID" slurmd && echo "slurmd:    running" || { echo "slurmd:    NOT running"; ok=1; }
    any_proc munged && echo "munged:    running" || echo "munged:    NOT running"
    if [[ $(conf_accounting) == 1 ]]; then
        pid_alive "$DBD_PID" slurmdbd && echo "slurmdbd:  running" || { echo "slurmdbd:  NOT running"; ok=1; }
        any_proc mariadbd && echo "mariadbd:  running" || { echo "mariadbd:  NOT running"; ok=1; }
    else
        echo "accounting: off (sacct does not work)"
    fi
    st=$(node_state)
    echo "node $NODE: ${st:-unknown (sinfo failed)}"
    healthy_state "$st" || ok=1
    return $ok
}

ACCOUNTING=${SLURM_ACCOUNTING:-}
ACTION=start
for arg in "$@"; do
    case "$arg" in
        --stop)          ACTION=stop ;;
        --status)        ACTION=status ;;
        --restart)       ACTION=restart ;;
        --accounting)    ACCOUNTING=1 ;;
        --no-accounting) ACCOUNTING=0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | cut -c3-; exit 0 ;;
        *) echo "$PROG: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done
case $ACTION in
    stop)    do_stop; exit 0 ;;
    status)  do_status; exit $? ;;
esac
# neither flag nor env: keep what the existing config has (default off)
if [[ -z $ACCOUNTING ]]; then
    ACCOUNTING=$(conf_accounting); ACCOUNTING=${ACCOUNTING:-0}
fi
[[ $ACCOUNTING == 1 ]] || ACCOUNTING=0
[[ $ACTION == restart ]] && do_stop

T0=$(now)

# ---------------------------------------------------------------- fast path
if command -v sinfo >/dev/null 2>&1 && pid_alive "$CTLD_PID" slurmctld && pid_alive "$SLURMD_PID" slurmd \
   && [[ $(conf_accounting) == "$ACCOUNTING" ]] && { ((ACCOUNTING == 0)) || pid_alive "$DBD_PID" slurmdbd; }; then
    st=$(node_state)
    if healthy_state "$st"; then
        log "already running, node $NODE is $st ($(elapsed "$T0") s)"
        sinfo
        exit 0
    fi
fi

# ---------------------------------------------------------------- install
TI=$(now)
PKGS=(slurm-wlm munge)
((ACCOUNTING)) && PKGS+=(slurmdbd mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # update the lists if they are missing or older than a day; retry once after an update
    if [[ -z $(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null | head -1) ]]; then
        apt-get update -qq || die "apt-get update failed"
    fi
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/start_slurm.apt.log 2>&1; then
        apt-get update -qq || true
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/start_slurm.apt.log 2>&1 \
            || { tail -n 30 /tmp/start_slurm.apt.log >&2; die "apt-get install ${missing[*]} failed"; }
    fi
    log "install took $(elapsed "$TI") s"
else
    log "${PKGS[*]} already installed ($(elapsed "$TI") s)"
fi
for b in slurmctld slurmd munged sinfo sbatch scontrol; do
    command -v "$b" >/dev/null 2>&1 || die "$b not found after install"
done

TS=$(now)

# ---------------------------------------------------------------- munge
start_munge() {
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    local mu=root i
    if id munge >/dev/null 2>&1; then mu=munge; fi
    if [[ ! -s $MUNGE_KEY ]]; then   # the Debian package normally creates one
        log "creating munge key"
        mungekey --create --keyfile="$MUNGE_KEY" --force >/dev/null 2>&1 \
            || dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
    chown "$mu:$mu" /etc/munge /var/lib/munge /var/log/munge /run/munge "$MUNGE_KEY"
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    chmod 0400 "$MUNGE_KEY"

    if any_proc munged && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munged already running"
        return 0
    fi
    any_proc munged && stop_proc "$MUNGE_PID" munged
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    log "starting munged as $mu"
    if [[ $mu == munge ]]; then
        runuser -u munge -- /usr/sbin/munged || die "munged failed to start"
    else
        /usr/sbin/munged --force || die "munged failed to start"
    fi
    for i in $(seq 1 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "munge -n | unmunge does not work"
}
start_munge

mkdir -p "$LOG_DIR" "$RUN_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"
chmod 0755 "$LOG_DIR" "$RUN_DIR"

# srun/slurmstepd look the node name up; make sure it resolves (daemons themselves use 127.0.0.1)
if ! getent hosts "$NODE" >/dev/null 2>&1; then
    log "$NODE does not resolve; adding '127.0.0.1 $NODE' to /etc/hosts"
    echo "127.0.0.1 $NODE" >>/etc/hosts || log "WARNING: cannot write /etc/hosts; srun may fail"
fi

# ---------------------------------------------------------------- accounting (optional)
start_mariadb() {
    local i
    if mariadb-admin ping >/dev/null 2>&1; then
        log "mariadb already running"
    else
        any_proc mariadbd && stop_proc "$MYSQL_PID" mariadbd
        mkdir -p /run/mysqld /var/log/mysql
        chown mysql:root /run/mysqld; chown mysql:adm /var/log/mysql 2>/dev/null || chown mysql /var/log/mysql
        if [[ ! -d /var/lib/mysql/mysql ]]; then
            log "initialising mariadb data dir"
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/tmp/start_slurm.mariadb-install.log 2>&1 \
                || { cat /tmp/start_slurm.mariadb-install.log >&2; die "mariadb-install-db failed"; }
        fi
        log "starting mariadbd (unix socket only)"
        # mariadbd does not daemonize: detach it ourselves
        setsid /usr/sbin/mariadbd --user=mysql --skip-networking --innodb-buffer-pool-size=64M \
            --log-error="$MYSQL_LOG" --pid-file="$MYSQL_PID" </dev/null >/dev/null 2>&1 &
        for i in $(seq 1 120); do
            mariadb-admin ping >/dev/null 2>&1 && break
            sleep 0.25
        done
        mariadb-admin ping >/dev/null 2>&1 || die "mariadbd did not come up"
    fi
}

start_slurmdbd() {
    local pw i
    pw=$(sed -n 's/^StoragePass=//p' "$DBD_CONF" 2>/dev/null || true)
    [[ -n $pw ]] || pw=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
    # root connects through the unix socket (unix_socket auth, Debian default)
    mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pw';
                ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pw';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;" \
        || die "cannot create the slurm database user"
    local tmp; tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Generated by start_slurm.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$DBD_PID
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$pw
StorageLoc=slurm_acct_db
EOF
    if ! cmp -s "$tmp" "$DBD_CONF" 2>/dev/null; then
        install -m 0600 -o root -g root "$tmp" "$DBD_CONF"
        any_proc slurmdbd && stop_proc "$DBD_PID" slurmdbd
    fi
    rm -f "$tmp"
    if ! pid_alive "$DBD_PID" slurmdbd; then
        any_proc slurmdbd && stop_proc "$DBD_PID" slurmdbd
        log "starting slurmdbd"
        slurmdbd || die "slurmdbd failed to start"
    fi
    for i in $(seq 1 120); do     # first start creates the tables: can take a few seconds
        port_open 6819 && return 0
        any_proc slurmdbd || die "slurmdbd exited during startup"
        sleep 0.25
    done
    die "slurmdbd does not listen on port 6819"
}

if ((ACCOUNTING)); then
    start_mariadb
    start_slurmdbd
fi

# ---------------------------------------------------------------- slurm.conf
write_conf() {
    local hw cpus boards sockets cores threads mem extra="" acct
    hw=$(slurmd -C 2>/dev/null | head -1) || true
    [[ $hw == NodeName=* ]] || die "slurmd -C did not print hardware info: $hw"
    field() { sed -n "s/.*[[:space:]]$1=\([0-9]*\).*/\1/p" <<<" $hw"; }
    cpus=$(field CPUs); boards=$(field Boards); sockets=$(field SocketsPerBoard)
    cores=$(field CoresPerSocket); threads=$(field ThreadsPerCore); mem=$(field RealMemory)
    [[ -n $cpus && -n $mem ]] || die "cannot parse slurmd -C output: $hw"
    local topo="Boards=${boards:-1} SocketsPerBoard=${sockets:-1} CoresPerSocket=${cores:-$cpus} ThreadsPerCore=${threads:-1}"
    if [[ -n ${SLURM_NODE_CPUS:-} && ${SLURM_NODE_CPUS} != "$cpus" ]]; then
        # oversubscribe: describe the node as SLURM_NODE_CPUS single-thread cores
        cpus=$SLURM_NODE_CPUS
        topo="Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1"
        extra="SlurmdParameters=config_overrides"
    fi
    if [[ -n ${SLURM_NODE_MEM_MB:-} ]]; then
        mem=$SLURM_NODE_MEM_MB
        extra="SlurmdParameters=config_overrides"
    fi
    if ((ACCOUNTING)); then
        acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
    else
        acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
    fi
    # default memory per CPU so that jobs without --mem do not grab the whole node
    local defmem=$(( mem / cpus ))
    local tmp
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Generated by start_slurm.sh for a single-node CI cluster. Do not edit by hand;
# rerun start_slurm.sh --restart instead.
ClusterName=$CLUSTER
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# requeued jobs wait cred_expire+1 s before they may start again (default 120 s!); minimum 5
AuthInfo=cred_expire=${SLURM_CRED_EXPIRE:-10}
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$acct
JobCompType=jobcomp/none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# fast turnaround for tests
MinJobAge=60
KillWait=5
OverTimeLimit=0
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$defmem
# preemption: a job in partition "urgent" preempts (requeues) jobs running in "debug".
# The victim gets its own --signal (submitit: USR2) at once thanks to
# SlurmctldParameters=preempt_send_user_signal (22.05 has no PreemptParameters),
# then GraceTime seconds before SIGTERM/SIGKILL and the requeue.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
${extra}
NodeName=${NODE} NodeHostname=${NODE} NodeAddr=127.0.0.1 CPUs=${cpus} ${topo} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 OverSubscribe=NO GraceTime=${SLURM_GRACE_TIME:-20}
PartitionName=urgent Nodes=${NODE} Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
    mkdir -p "$CONF_DIR"
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"; return 1      # unchanged
    fi
    if [[ -f $CONF ]] && ! grep -q 'Generated by start_slurm.sh' "$CONF"; then
        cp -p "$CONF" "$CONF.orig.$(date +%s)"
    fi
    install -m 0644 "$tmp" "$CONF"; rm -f "$tmp"
    log "wrote $CONF (node $NODE: CPUs=$cpus RealMemory=$mem accounting=$ACCOUNTING)"
    return 0
}
conf_changed=0
write_conf && conf_changed=1

if ((conf_changed)) && { any_proc slurmctld || any_proc slurmd; }; then
    log "slurm.conf changed; restarting slurm daemons"
    stop_proc "$SLURMD_PID" slurmd
    stop_proc "$CTLD_PID" slurmctld
fi
if ((ACCOUNTING == 0)) && any_proc slurmdbd; then
    stop_proc "$DBD_PID" slurmdbd      # left over from an --accounting run
fi

# ---------------------------------------------------------------- slurmctld / slurmd
ctld_up() { timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; }
if ! pid_alive "$CTLD_PID" slurmctld; then
    any_proc slurmctld && stop_proc "$CTLD_PID" slurmctld   # stray one without pid file
    ctld_args=(-i)
    [[ ${SLURM_CLEAR_STATE:-0} == 1 ]] && ctld_args=(-c)
    log "starting slurmctld ${ctld_args[*]}"
    slurmctld -f "$CONF" "${ctld_args[@]}" || die "slurmctld failed to start (bad slurm.conf?)"
fi
for i in $(seq 1 100); do
    ctld_up && break
    any_proc slurmctld || die "slurmctld exited during startup"
    sleep 0.2
done
ctld_up || die "slurmctld does not answer scontrol ping"

if ((ACCOUNTING)); then
    # slurmctld registers the cluster itself; add it explicitly if it did not
    for i in $(seq 1 40); do
        sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER" && break
        ((i == 10)) && { sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true; }
        sleep 0.25
    done
    sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER" \
        || die "cluster $CLUSTER not registered in slurmdbd"
fi

if ! pid_alive "$SLURMD_PID" slurmd; then
    any_proc slurmd && stop_proc "$SLURMD_PID" slurmd
    log "starting slurmd -N $NODE"
    slurmd -f "$CONF" -N "$NODE" || die "slurmd failed to start"
fi

# ---------------------------------------------------------------- wait for idle
deadline=$(( $(date +%s) + WAIT_S ))
resumed=0
st=""
while :; do
    st=$(node_state)
    healthy_state "$st" && break
    any_proc slurmd || die "slurmd exited (node state: ${st:-?})"
    # a node left DOWN/DRAIN from an earlier run: resume it once slurmd is up
    if ((resumed == 0)) && [[ $st =~ ^(down|drain) ]]; then
        log "node is $st, resuming it"
        scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
        resumed=1
    fi
    (( $(date +%s) < deadline )) || die "node $NODE not idle after ${WAIT_S} s (state: ${st:-sinfo failed}; reason: $(sinfo -h -n "$NODE" -o %E 2>/dev/null))"
    sleep 0.5
done
if ((ACCOUNTING)); then
    timeout 10 sacct -n -X -S now-1minutes >/dev/null 2>&1 || die "sacct does not work"
fi
log "slurm is up: node $NODE is $st, accounting=$ACCOUNTING; start took $(elapsed "$TS") s, total $(elapsed "$T0") s"
sinfo
