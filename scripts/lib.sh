# Helpers shared by bench.sh, bench-knee.sh and profile.sh; sourced, not run. Every wait
# is bounded by the caller's DEADLINE_SECS.

die() { echo "${0##*/}: $*" >&2; exit 1; }

# Stops what the calling script started and still runs (only its own jobs),
# continuing stopped ones first so the kill lands.
stop_own_jobs() {
    local pid
    for pid in $(jobs -p); do
        kill -CONT "$pid" 2>/dev/null || true
        kill -KILL "$pid" 2>/dev/null || true
    done
}

# wait_for FILE REGEX PID: waits (bounded) until a line of FILE matches,
# while process PID lives.
wait_for() {
    local i
    for ((i = 0; i < DEADLINE_SECS * 20; i++)); do
        grep -qE "$2" "$1" 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || die "process $3 exited; see $1: $(tail -3 "$1")"
        sleep 0.05
    done
    die "timed out waiting for /$2/ in $1"
}

# stats_counter LOG NAME: NAME's value in the daemon's latest stats line
# (0 before the first).
stats_counter() {
    local v
    v=$( (grep -o "stats: .*$2=[0-9]*" "$1" || true) | tail -1 | grep -o '[0-9]*$' || true)
    echo "${v:-0}"
}

now() { date +%s.%N; }
# calc EXPR [DECIMALS]: EXPR evaluated by awk, with DECIMALS (default 3).
calc() { awk "BEGIN { printf \"%.${2:-3}f\", $1 }"; }
# utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
# thread_ticks PID NAME: utime + stime of PID's thread named NAME (0 if none).
thread_ticks() {
    local t
    for t in /proc/"$1"/task/*; do
        if [[ "$(cat "$t/comm" 2>/dev/null)" == "$2" ]]; then
            cpu_ticks "$1/task/${t##*/}"
            return
        fi
    done
    echo 0
}
