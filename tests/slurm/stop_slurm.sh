#!/usr/bin/env bash
# Stop the single-node SLURM started by start_slurm.sh:   tests/slurm/stop_slurm.sh STATE_DIR
# Cancels any job still known to that slurmctld, then ends exactly the processes listed in STATE_DIR/pids
# (slurmd, slurmctld, munged; a PID whose program name no longer matches is left alone), waits for them
# (SIGTERM, then SIGKILL after STOP_TIMEOUT seconds, default 20) and removes the PID list and runtime files.
# Logs and slurm.conf are kept in STATE_DIR for inspection. Safe to call twice.
set -uo pipefail

die() { echo "stop_slurm.sh: ERROR: $*" >&2; exit 1; }
log() { echo "stop_slurm.sh: $*" >&2; }

[[ $# -eq 1 ]] || die "usage: $0 STATE_DIR"
[[ -d "$1" ]] || { log "no state dir $1: nothing to stop"; exit 0; }
STATE="$(cd "$1" && pwd)"
PIDS="$STATE/pids"
TIMEOUT="${STOP_TIMEOUT:-20}"
export SLURM_CONF="$STATE/slurm.conf"

# the link /etc/slurm/slurm.conf that start_slurm.sh made (only if it still points to this state dir)
remove_link() {
    if [[ -L /etc/slurm/slurm.conf && "$(readlink /etc/slurm/slurm.conf)" == "$SLURM_CONF" ]]; then
        rm -f /etc/slurm/slurm.conf
    fi
}
[[ -s "$PIDS" ]] || { remove_link; log "no $PIDS: nothing to stop"; exit 0; }

alive() { [[ -r /proc/$2/comm ]] && [[ "$(cat "/proc/$2/comm" 2>/dev/null)" == "$1" ]]; }

# Jobs first (their slurmstepd processes belong to slurmd's jobs, not to our PID list), while the daemons run.
if grep -q '^slurmctld ' "$PIDS" && [[ -r "$SLURM_CONF" ]]; then
    ctld_pid="$(awk '$1 == "slurmctld" {print $2}' "$PIDS")"
    if alive slurmctld "$ctld_pid" && [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; then
        log "cancelling jobs still queued or running: $(squeue -h -o %i | tr '\n' ' ')"
        scancel --full --quiet --user=root 2>/dev/null || true
        for _ in $(seq 1 40); do
            [[ -z "$(squeue -h -t PENDING,RUNNING,COMPLETING -o %i 2>/dev/null)" ]] && break
            sleep 0.5
        done
    fi
fi

# Then the daemons, in reverse start order: slurmd, slurmctld, munged.
mapfile -t entries < <(tac "$PIDS")
for entry in "${entries[@]}"; do
    read -r name pid <<<"$entry"
    if ! alive "$name" "$pid"; then
        log "$name (pid $pid) is not running"
        continue
    fi
    kill -TERM "$pid" 2>/dev/null
    deadline=$((SECONDS + TIMEOUT))
    while alive "$name" "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    if alive "$name" "$pid"; then
        log "$name (pid $pid) ignored SIGTERM for ${TIMEOUT}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null
        sleep 0.5
    fi
    if alive "$name" "$pid"; then
        log "ERROR: $name (pid $pid) is still running"
        failed=1
    else
        log "stopped $name (pid $pid)"
    fi
done
[[ -n "${failed:-}" ]] && exit 1

rm -f "$PIDS" "$STATE/slurmctld.pid" "$STATE/slurmd.pid"
remove_link
exit 0
