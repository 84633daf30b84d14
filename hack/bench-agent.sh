#!/usr/bin/env bash
# hack/bench-agent.sh [RESTARTS]: how fast the agent restarts a consumer that exits 0, and how
# much memory the agent itself holds. Prints figures; asserts nothing.
#
# The consumer is `bash -c` writing "s <time>" when it starts and "e <time>" just before it exits
# 0 (bash's $EPOCHREALTIME: no fork). The restart gap is the time from one run's "e" to the next
# run's "s": bash exiting, SIGCHLD, the agent reaping, checking the stop flag, rendering the limit
# arguments, fork+exec, bash starting. The same consumer restarted by a plain shell loop gives
# the baseline (what fork+exec+bash alone cost on this machine).
#
# Environment: WORKERPOOL_BIN (default: target/release/workerpool, built if missing).
set -euo pipefail
export LC_ALL=C

RESTARTS=${1:-500}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${WORKERPOOL_BIN:-$ROOT/target/release/workerpool}
if [ ! -x "$BIN" ]; then
    echo "building $BIN ..." >&2
    cargo build --release --manifest-path "$ROOT/Cargo.toml" >&2
fi

WORK=$(mktemp -d)
AGENT_PID=
cleanup() {
    if [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; then
        kill -TERM "$AGENT_PID" 2>/dev/null || true
        wait "$AGENT_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/flag"
echo r1 >"$WORK/flag/revision"

CONSUMER='echo "s $EPOCHREALTIME" >>"$F"; echo "e $EPOCHREALTIME" >>"$F"'

# gaps in ms from an s/e log: median, p99, max, count
gaps() {
    awk '$1 == "e" { e = $2 } $1 == "s" && e != "" { printf "%.3f\n", ($2 - e) * 1000; e = "" }' "$1" | sort -n |
        awk '{ v[NR] = $1 } END {
            if (NR == 0) { print "no gaps"; exit }
            m = v[int((NR + 1) / 2)]; p = v[int(NR * 0.99 + 0.999)]; if (p == "") p = v[NR]
            printf "median %.2f ms  p99 %.2f ms  max %.2f ms  (%d restarts)\n", m, p, v[NR], NR
        }'
}

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

# --- the agent ---
export F="$WORK/agent.log"
: >"$F"
WORKERPOOL_LOG=warn "$BIN" agent --flag-dir "$WORK/flag" --pool bench --revision r1 --pod-name bench-0 \
    --messages 100 --time-limit-seconds 3600 -- bash -c "$CONSUMER" 2>"$WORK/agent.stderr" &
AGENT_PID=$!
max_rss=0
started=$(date +%s)
while [ "$(grep -c '^s' "$F" || true)" -le "$RESTARTS" ]; do
    rss=$(rss_kib "$AGENT_PID")
    [ "${rss:-0}" -gt "$max_rss" ] && max_rss=$rss
    if [ $(($(date +%s) - started)) -gt 120 ]; then
        echo "too slow: gave up after 120 s" >&2
        break
    fi
    sleep 0.05
done
hwm=$(hwm_kib "$AGENT_PID")
kill -TERM "$AGENT_PID"
wait "$AGENT_PID" || true
AGENT_PID=

# --- idle agent (consumer sleeping): steady-state RSS ---
WORKERPOOL_LOG=warn "$BIN" agent --flag-dir "$WORK/flag" --pool bench --revision r1 --pod-name bench-0 \
    -- sleep 30 2>>"$WORK/agent.stderr" &
AGENT_PID=$!
sleep 1.5
idle_rss=$(rss_kib "$AGENT_PID")
kill -TERM "$AGENT_PID"
wait "$AGENT_PID" || true
AGENT_PID=

# --- baseline: the same consumer restarted by a shell loop ---
export F="$WORK/baseline.log"
: >"$F"
for _ in $(seq 0 "$RESTARTS"); do bash -c "$CONSUMER"; done

echo "binary:          $BIN ($(du -k "$BIN" | cut -f1) KiB)"
echo "restart gap, agent:          $(gaps "$WORK/agent.log")"
echo "restart gap, shell loop:     $(gaps "$WORK/baseline.log")"
echo "agent RSS while restarting:  max ${max_rss} KiB sampled, peak (VmHWM) ${hwm} KiB"
echo "agent RSS idle:              ${idle_rss} KiB"
if grep -q . "$WORK/agent.stderr"; then
    echo "agent warnings:"
    sed 's/^/  /' "$WORK/agent.stderr"
fi
