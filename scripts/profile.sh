#!/usr/bin/env bash
# Where the time goes (issue 4): a `perf` profile of one benchmark run, as
# CPU time per thread and the hottest functions of each. It is the evidence
# behind the README's "What bounds the targets that are not met".
#
#   e2e    `perf record -a` (the whole machine, so the sender shows too)
#          while examples/bench_send blasts N readings at `sensord serve`,
#          until all are committed
#   drain  `perf record -p` of the daemon alone while it drains N readings
#          that filled its socket buffer while it was stopped (SIGSTOP)
#   flush  `perf record -p` of the daemon from SIGTERM to exit, with N
#          readings queued (--flush-interval 1h)
#
# Usage: scripts/profile.sh [e2e|drain|flush] (default e2e)
# Settings: PROFILE_N=1000000, PROFILE_TOP=12 (functions per thread),
#           PROFILE_KEEP=DIR (keep perf.data and the daemon's log there).
# Needs `perf` (linux-perf); samples the cpu-clock software event, so it
# works without hardware counters. Run as root for kernel symbols.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

MODE=${1:-e2e}
N=${PROFILE_N:-1000000}
TOP=${PROFILE_TOP:-12}
DEADLINE_SECS=120
case "$MODE" in e2e | drain | flush) ;; *)
    echo "usage: scripts/profile.sh [e2e|drain|flush]" >&2
    exit 2
    ;;
esac
command -v perf >/dev/null || { echo "profile: needs perf (apt-get install linux-perf)" >&2; exit 1; }

echo "building (release)..." >&2
cargo build --release --quiet --bin sensord --example bench_send
BIN="${CARGO_TARGET_DIR:-target}/release"
WORK=$(mktemp -d)
cleanup() {
    stop_own_jobs
    if [[ -n "${PROFILE_KEEP:-}" ]]; then
        mkdir -p "$PROFILE_KEEP" && cp "$WORK"/perf.data "$WORK"/daemon.log "$PROFILE_KEEP"/ 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

DB="$WORK/profile.db" LOG="$WORK/daemon.log"
serve_args=(--bind 127.0.0.1:0 --db "$DB" --stats-interval 100ms)
# The drain and flush runs hold N readings in the socket buffer or queue.
[[ $MODE == e2e ]] || serve_args+=(--recv-buffer $((N * 2048 > 2147483647 ? 2147483647 : N * 2048)))
[[ $MODE == flush ]] && serve_args+=(--flush-interval 1h --batch-size $((2 * N)))
"$BIN/sensord" serve "${serve_args[@]}" 2>"$LOG" &
DPID=$!
# wait_counter NAME: waits (bounded) until the stats line's NAME reaches N.
wait_counter() {
    local i
    for ((i = 0; i < DEADLINE_SECS * 20; i++)); do
        (($(stats_counter "$LOG" "$1") >= N)) && return 0
        sleep 0.05
    done
    die "timed out waiting for $1=$N"
}
wait_for "$LOG" 'listening on ' "$DPID"
ADDR=$(grep -o 'listening on [0-9.:]*' "$LOG" | head -1 | cut -d' ' -f3)
send() { "$BIN/examples/bench_send" "$ADDR" "$N" >/dev/null; }

perf_args=(record -e cpu-clock -F 1999 -o "$WORK/perf.data" --quiet)
case "$MODE" in
e2e)
    perf "${perf_args[@]}" -a &
    PERF=$!
    sleep 0.2
    send
    wait_counter persisted
    ;;
drain)
    kill -STOP "$DPID"
    send
    perf "${perf_args[@]}" -p "$DPID" &
    PERF=$!
    sleep 0.2
    kill -CONT "$DPID"
    wait_counter persisted
    ;;
flush)
    send
    wait_counter received
    perf "${perf_args[@]}" -p "$DPID" &
    PERF=$!
    sleep 0.2
    kill -TERM "$DPID"
    wait "$DPID" || die "sensord exited with status $?"
    ;;
esac
kill -INT "$PERF"
wait "$PERF" || true
if [[ $MODE != flush ]]; then
    kill -TERM "$DPID"
    wait "$DPID" || die "sensord exited with status $?"
fi

report() { perf report -i "$WORK/perf.data" --stdio --no-children --percent-limit "$1" "${@:2}" 2>/dev/null | grep -v '^#' | grep -v '^$' | sed 's/ *$//'; }
echo
echo "sensord profile: $MODE, N=$N, $(nproc) CPUs, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "$(grep -o 'shutdown complete.*' "$LOG")"
echo
echo "share of samples by thread (>= 1%):"
report 1 --sort comm
for thread in bench_send receiver persister checkpointer flusher sorter sensord; do
    lines=$( (report 0.5 --comms "$thread" --percentage relative --sort sym || true) | head -n "$TOP")
    [[ -n "$lines" ]] || continue
    kernel=$( (report 0 --comms "$thread" --percentage relative --sort sym || true) |
        awk '$2 == "[k]" { sum += $1 } END { printf "%.0f", sum }')
    echo
    echo "$thread: ${kernel}% in the kernel; hottest functions (% of the thread's samples, [k] kernel)"
    echo "$lines"
done
