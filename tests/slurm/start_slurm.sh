#!/usr/bin/env bash
# Start a single-node SLURM (Debian 12, slurm-wlm 22.05) on this machine, without systemd, for testing the
# workflow's SLURM profile:   tests/slurm/start_slurm.sh STATE_DIR [PARTITION]
#
#   - installs slurmctld, slurmd, slurm-client and munge with apt-get if they are missing (root needed);
#   - writes STATE_DIR/slurm.conf (one node named after `hostname -s`, with the CPUs and memory `slurmd -C`
#     reports; one partition, default name "main"; no cgroups, no accounting database) and STATE_DIR/env.sh;
#   - starts munged (as the munge user; an already working munged is reused and left alone), slurmctld and
#     slurmd in the foreground mode, detached, and writes "name pid" lines to STATE_DIR/pids;
#   - waits until `sinfo` shows the node idle.
# Idempotent: a second call with the same STATE_DIR whose daemons are alive only checks the node.
# Clients need the config:  source STATE_DIR/env.sh   (sets SLURM_CONF; /etc/slurm is not touched).
# Stop with tests/slurm/stop_slurm.sh STATE_DIR, which ends exactly the processes listed in STATE_DIR/pids.
# Environment: SLURM_START_TIMEOUT (seconds per wait, default 60).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { echo "start_slurm.sh: ERROR: $*" >&2; exit 1; }
log() { echo "start_slurm.sh: $*" >&2; }

[[ $# -ge 1 && $# -le 2 ]] || die "usage: $0 STATE_DIR [PARTITION]"
PARTITION="${2:-main}"
[[ "$PARTITION" =~ ^[A-Za-z0-9_-]+$ ]] || die "invalid partition name '$PARTITION'"
TIMEOUT="${SLURM_START_TIMEOUT:-60}"
[[ $EUID -eq 0 ]] || die "must run as root (installs packages, starts munged as the munge user)"
mkdir -p "$1"
STATE="$(cd "$1" && pwd)"
PIDS="$STATE/pids"
HOST="$(hostname -s)"
export SLURM_CONF="$STATE/slurm.conf"

# --- helpers ------------------------------------------------------------------------------------------------
# alive NAME PID: the process exists and is the program we started (a recycled PID is not ours).
alive() { [[ -r /proc/$2/comm ]] && [[ "$(cat "/proc/$2/comm" 2>/dev/null)" == "$1" ]]; }

# wait_for DESCRIPTION LOGFILE COMMAND...: retry COMMAND every 0.5 s until it succeeds or TIMEOUT passes.
wait_for() {
    local what="$1" logfile="$2"; shift 2
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${TIMEOUT}s waiting for $what"
            if [[ -n "$logfile" && -r "$logfile" ]]; then
                log "last lines of $logfile:"; tail -n 30 "$logfile" >&2
            fi
            fail_cleanup
            die "$what did not come up (state: $STATE)"
        fi
        sleep 0.5
    done
}

fail_cleanup() {
    # stop whatever this script started, so that a failed start leaves no daemon behind
    [[ -s "$PIDS" ]] && "$HERE/stop_slurm.sh" "$STATE" >&2 || true
}

munge_works() { munge -n </dev/null | unmunge >/dev/null; }
node_idle() { [[ "$(sinfo -h -n "$HOST" -o %T 2>/dev/null)" == "idle" ]]; }

# start_daemon NAME LOGFILE COMMAND...: run COMMAND detached (own session, no terminal, stdio to LOGFILE) and
# record its PID. setsid does not fork here (a background child of a non-interactive shell is no process group
# leader), so $! is the daemon itself; this is checked.
start_daemon() {
    local name="$1" out="$2"; shift 2
    setsid "$@" </dev/null >>"$out" 2>&1 &
    local pid=$!
    echo "$name $pid" >>"$PIDS"
    sleep 0.3
    alive "$name" "$pid" || {
        log "$name (pid $pid) exited at once; last lines of $out:"; tail -n 30 "$out" >&2
        fail_cleanup; die "could not start $name"
    }
    log "started $name (pid $pid)"
}

# --- already running with this state dir? -------------------------------------------------------------------
if [[ -s "$PIDS" ]]; then
    all_alive=1
    while read -r name pid; do alive "$name" "$pid" || all_alive=0; done <"$PIDS"
    if ((all_alive)) && [[ -r "$SLURM_CONF" ]]; then
        wait_for "node $HOST idle in sinfo" "$STATE/slurmd.log" node_idle
        log "already running (state: $STATE)"
        exit 0
    fi
    log "stale state in $STATE: stopping what is left of it first"
    "$HERE/stop_slurm.sh" "$STATE" >&2
fi

# --- packages -----------------------------------------------------------------------------------------------
need=()
for prog in slurmctld slurmd sbatch squeue sinfo scontrol munged munge unmunge; do
    command -v "$prog" >/dev/null 2>&1 || need+=("$prog")
done
if ((${#need[@]})); then
    command -v apt-get >/dev/null 2>&1 || die "missing ${need[*]} and no apt-get to install them"
    log "installing slurmctld slurmd slurm-client munge (missing: ${need[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >&2 \
        || die "apt-get install slurmctld slurmd slurm-client munge failed"
fi

# --- refuse to fight with a SLURM we did not start ----------------------------------------------------------
for prog in slurmctld slurmd; do
    if other="$(pgrep -x "$prog")"; then
        die "a $prog not started with this state dir is running (pid $(echo $other)); stop it first"
    fi
done

# --- configuration ------------------------------------------------------------------------------------------
mkdir -p "$STATE/slurmctld" "$STATE/slurmd"
: >"$PIDS"
node_line="$(slurmd -C | head -n 1)"
[[ "$node_line" == NodeName=* ]] || die "unexpected output of 'slurmd -C': $node_line"
node_line="$(sed -E "s/^NodeName=[^ ]+/NodeName=$HOST/" <<<"$node_line")"
sed -e "s|@HOST@|$HOST|g" -e "s|@STATE@|$STATE|g" -e "s|@PARTITION@|$PARTITION|g" \
    -e "s|@NODE_LINE@|$node_line|" "$HERE/slurm.conf.in" >"$SLURM_CONF"
printf 'export SLURM_CONF=%q\n' "$SLURM_CONF" >"$STATE/env.sh"
# srun inside a job does not see SLURM_CONF (snakemake-executor-plugin-slurm-jobstep drops every SLURM_*
# variable but the job's identity before its nested srun), so the default path must lead to this config
# too: a symlink /etc/slurm/slurm.conf -> STATE_DIR/slurm.conf, removed by stop_slurm.sh. A real file there
# is never replaced.
ETC_CONF=/etc/slurm/slurm.conf
if [[ -L "$ETC_CONF" ]]; then
    target="$(readlink "$ETC_CONF")"
    if [[ "$target" != "$SLURM_CONF" && -s "$(dirname "$target")/pids" ]]; then
        fail_cleanup
        die "$ETC_CONF points to $target, whose SLURM still runs" \
            "(stop it with stop_slurm.sh $(dirname "$target"))"
    fi
elif [[ -e "$ETC_CONF" ]]; then
    fail_cleanup
    die "$ETC_CONF exists and is not a link made by this script: not replacing a real SLURM configuration"
fi
mkdir -p /etc/slurm
ln -sfn "$SLURM_CONF" "$ETC_CONF"
log "node: $node_line; partition: $PARTITION; config: $SLURM_CONF"

# --- munge --------------------------------------------------------------------------------------------------
if munge_works 2>/dev/null; then
    log "a working munged is already running: reusing it (it will not be stopped)"
else
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 0700 /etc/munge
        mungekey --create --keyfile /etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    start_daemon munged "$STATE/munged.out" \
        setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground --force
    wait_for "munged to answer" "$STATE/munged.out" munge_works
fi

# --- slurmctld, slurmd --------------------------------------------------------------------------------------
start_daemon slurmctld "$STATE/slurmctld.out" slurmctld -D -i -f "$SLURM_CONF"
wait_for "slurmctld to answer 'scontrol ping'" "$STATE/slurmctld.log" \
    bash -c 'scontrol ping | grep -q "is UP"'
start_daemon slurmd "$STATE/slurmd.out" slurmd -D -f "$SLURM_CONF"
wait_for "node $HOST idle in sinfo" "$STATE/slurmd.log" node_idle
log "SLURM is up: $(sinfo -h -o '%P %D %T %c CPUs %m MB' | head -n 1)"
