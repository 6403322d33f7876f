#!/usr/bin/env bash
# The zero-loss knee: the highest steady rate at which sensord loses
# nothing. For each store (SQLite, PostgreSQL) and receive buffer, and each
# rate in turn, one step:
#   start `sensord serve --bind 127.0.0.1:0` on a fresh SQLite file or a
#   fresh PostgreSQL table; examples/bench_send paces RATE datagrams/s at it
#   for KNEE_SECS (1 ms bursts, sleeping between them); wait until the
#   daemon has read its socket empty; read its CPU from /proc; SIGTERM;
#   loss = sent - rows stored, and kernel_drops from its `shutdown complete:`
#   line.
# The knee of a configuration is the highest rate with zero loss in every
# repetition, with no lossy rate below it. Repetitions are the outer loop,
# so each configuration's repetitions are spread over the run and drift in
# the machine's load falls on all of them alike.
# Prints one table per configuration and writes everything as JSON to
# $KNEE_OUT. `scripts/bench.sh` runs it after its own table when BENCH_KNEE=1.
#
# Usage: scripts/bench-knee.sh                 (about 25 minutes: see docs/performance.md)
#        KNEE_QUICK=1 scripts/bench-knee.sh    (smoke test, under a minute)
#        SENSORD=/path/to/sensord scripts/bench-knee.sh   (another build, e.g. an older commit)
# Settings (environment):
#   SENSORD=target/release/sensord   daemon to measure (built here if unset)
#   KNEE_LABEL       names that daemon in the report [default: this tree's commit,
#                    or the path given as SENSORD]
#   KNEE_RATES="50000 100000 150000 200000 250000 300000"   datagrams/s, ascending
#   KNEE_SECS=10     seconds of sending per step
#   KNEE_REPS=3      repetitions; KNEE_PG_REPS (default KNEE_REPS) for PostgreSQL
#   KNEE_BUFFERS="4194304 212992 default"   --recv-buffer values; `default`
#                    passes none (sensord's 128 MiB request)
#   KNEE_STORES="sqlite postgres"; `bare` adds examples/bare_recv, a receive
#                    loop that stores nothing, in sensord's place: the loss
#                    the machine alone causes at each rate
#   KNEE_PG_URL      an existing PostgreSQL server (postgres://user@host:port/db)
#                    instead of the throwaway cluster the script starts
#   KNEE_SERVE_ARGS=""   extra arguments for every `sensord serve`
#   KNEE_OUT=bench-results/knee.json
#   CARGO_TARGET_DIR honoured, as cargo does
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

if [[ "${KNEE_QUICK:-0}" == 1 ]]; then
    : "${KNEE_RATES:=50000 200000}" "${KNEE_SECS:=2}" "${KNEE_REPS:=1}" "${KNEE_BUFFERS:=4194304}"
fi
read -r -a RATES <<<"${KNEE_RATES:-50000 100000 150000 200000 250000 300000}"
SECS=${KNEE_SECS:-10}
REPS=${KNEE_REPS:-3}
PG_REPS=${KNEE_PG_REPS:-$REPS}
read -r -a BUFFERS <<<"${KNEE_BUFFERS:-4194304 212992 default}"
read -r -a STORES <<<"${KNEE_STORES:-sqlite postgres}"
OUT=${KNEE_OUT:-bench-results/knee.json}
read -r -a SERVE_ARGS <<<"${KNEE_SERVE_ARGS:-}"
# Every wait below gives up after this long.
DEADLINE_SECS=120

BIN="${CARGO_TARGET_DIR:-target}/release"
echo "building (release)..." >&2
if [[ -n "${SENSORD:-}" ]]; then
    cargo build --release --quiet --example bench_send --example bare_recv
    LABEL=${KNEE_LABEL:-$SENSORD}
else
    cargo build --release --quiet --bin sensord --example bench_send --example bare_recv
    SENSORD="$BIN/sensord"
    LABEL=${KNEE_LABEL:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
fi
[[ -x "$SENSORD" ]] || die "no sensord at $SENSORD"
SENDER="$BIN/examples/bench_send"
BARE="$BIN/examples/bare_recv"
WORK=$(mktemp -d)
PG_DIR=""
cleanup() {
    stop_own_jobs
    pg_stop
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo "bench-knee: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
CLK_TCK=$(getconf CLK_TCK)

# --- PostgreSQL: a throwaway cluster, run by `postgres` when we are root ---
AS_PG=()
[[ "$(id -u)" -eq 0 ]] && AS_PG=(runuser -u postgres --)
PG_URL=${KNEE_PG_URL:-}
pg_start() {
    local initdb bin port
    initdb=$(command -v initdb || ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1 || true)
    [[ -n "$initdb" ]] || die "PostgreSQL's server binaries (initdb, pg_ctl) not found: install them, set KNEE_PG_URL, or KNEE_STORES=sqlite"
    command -v psql >/dev/null || die "psql is needed to count PostgreSQL rows"
    bin=$(dirname "$initdb")
    PG_DIR=$(mktemp -d /tmp/sensord-knee-pg-XXXXXX)
    chmod 0777 "$PG_DIR"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    # pg_ctl's -w -t bounds the start; the server keeps its default
    # durability settings, as a deployment would.
    (cd "$PG_DIR" &&
        "${AS_PG[@]}" "$bin/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 >/dev/null &&
        "${AS_PG[@]}" "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
            -o "-p $port -k $PG_DIR -c listen_addresses=127.0.0.1" start >/dev/null) ||
        die "cannot start PostgreSQL in $PG_DIR"
    PG_BIN=$bin
    PG_URL="postgres://postgres@127.0.0.1:$port/postgres"
}
pg_stop() {
    [[ -n "$PG_DIR" ]] || return 0
    (cd "$PG_DIR" && "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w -t 30 stop >/dev/null 2>&1) || true
    rm -rf "$PG_DIR"
    PG_DIR=""
}
pg_sql() { PGCONNECT_TIMEOUT=10 psql "$PG_URL" -Atqc "SET client_min_messages = warning; SET statement_timeout = '60s'; $1"; }

# --- one step ---------------------------------------------------------------
# rx_queue PORT: bytes waiting in the receive queue of the UDP socket bound
# to 127.0.0.1:PORT (empty if there is none).
rx_queue() {
    local hex
    hex=$(printf '0100007F:%04X' "$1")
    hex=$(awk -v a="$hex" '$2 == a { split($5, q, ":"); print q[2]; exit }' /proc/net/udp)
    [[ -z "$hex" ]] || echo $((16#$hex))
}
# wait_read PORT: waits (bounded) until the daemon has read its socket empty.
wait_read() {
    local i q
    for ((i = 0; i < DEADLINE_SECS * 20; i++)); do
        q=$(rx_queue "$1")
        [[ -z "$q" || "$q" == 0 ]] && return 0
        sleep 0.05
    done
    echo "bench-knee: note: the socket still held $q bytes after ${DEADLINE_SECS}s" >&2
}
# field LINE NAME: NAME's value in a `name=value` line (0 if absent).
field() { (grep -o "$2=[0-9.]*" <<<"$1" || echo "=0") | head -1 | cut -d= -f2; }

declare -A LOSS LOSS_PCT DROPS SEND_CPU DAEMON_CPU RECV_CPU PERS_CPU ACHIEVED GRANTED
STEP=0
# run_step STORE BUFFER RATE REP: one step; appends its record to
# $WORK/steps.jsonl and fills the arrays above under "STORE BUFFER RATE REP".
run_step() {
    local store=$1 buffer=$2 rate=$3 rep=$4 key="$1 $2 $3 $4"
    local log db table="" args=() addr port pid
    STEP=$((STEP + 1))
    # A log of its own per step: the shell may look for `listening on`
    # before the new daemon's redirection has emptied a reused file.
    log="$WORK/sensord-$STEP.log"
    if [[ $store == bare ]]; then
        # Stops by itself once it has them all, or 1 s after the last.
        "$BARE" 127.0.0.1:0 $((rate * SECS)) "${buffer/default/134217728}" 1 >"$log" &
    else
        if [[ $store == sqlite ]]; then
            db="$WORK/knee.db"
            rm -f "$db" "$db-wal" "$db-shm" "$db.spill.jsonl"
        else
            db=$PG_URL table="knee_step_$STEP"
            args+=(--table "$table")
            pg_sql "DROP TABLE IF EXISTS $table" >/dev/null
        fi
        [[ $buffer == default ]] || args+=(--recv-buffer "$buffer")
        "$SENSORD" serve --bind 127.0.0.1:0 --db "$db" --stats-interval 0 --spill "$WORK/spill.jsonl" \
            "${args[@]}" "${SERVE_ARGS[@]}" 2>"$log" &
    fi
    pid=$!
    wait_for "$log" 'listening on ' "$pid"
    addr=$(grep -o 'listening on [0-9.:]*' "$log" | head -1 | cut -d' ' -f3)
    port=${addr##*:}
    # bare_recv logs nothing: as root it gets double its request too.
    GRANTED["$store $buffer"]=$( (grep -o 'kernel granted [0-9]*' "$log" ||
        echo "x x $((2 * ${buffer/default/134217728}))") | head -1 | cut -d' ' -f3)

    local c0 r0 p0 t0 c1 r1 p1 t1 out sent failed secs cpu
    c0=$(cpu_ticks "$pid") r0=$(thread_ticks "$pid" receiver) p0=$(thread_ticks "$pid" persister)
    t0=$(now)
    out=$("$SENDER" "$addr" $((rate * SECS)) --rate "$rate")
    wait_read "$port"
    # bare_recv may have exited already: its CPU then reads as none.
    c1=$(cpu_ticks "$pid" 2>/dev/null || echo "$c0")
    r1=$(thread_ticks "$pid" receiver) p1=$(thread_ticks "$pid" persister)
    t1=$(now)
    sent=$(field "$out" sent) failed=$(field "$out" failed)
    secs=$(field "$out" seconds) cpu=$(field "$out" cpu_seconds)
    # Refused sends mean nobody listened: the step measured nothing.
    ((failed == 0)) || die "$failed sends to $addr failed (log: $log)"

    local i status=0
    [[ $store == bare ]] || kill -TERM "$pid"
    for ((i = 0; i < DEADLINE_SECS * 20; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -0 "$pid" 2>/dev/null && die "$store receiver did not stop within ${DEADLINE_SECS}s (log: $log)"
    wait "$pid" || status=$?
    local line rows
    if [[ $store == bare ]]; then
        rows=$(field "$(cat "$log")" received)
        # No drop counter: what did not arrive overflowed the buffer.
        line="kernel_drops=$((sent - rows)) received=$rows"
    else
        line=$(grep 'shutdown complete:' "$log" || true)
        [[ -n "$line" ]] || die "sensord (status $status) logged no shutdown line: $(tail -3 "$log")"
    fi
    if [[ $store == bare ]]; then
        :
    elif [[ $store == sqlite ]]; then
        rows=$(sqlite3 -cmd '.timeout 5000' "$db" 'SELECT COUNT(*) FROM sensor_measurements')
    else
        rows=$(pg_sql "SELECT count(*) FROM $table")
        pg_sql "DROP TABLE $table" >/dev/null
    fi

    local wall
    wall=$(calc "$t1 - $t0" 6)
    LOSS[$key]=$((sent - rows))
    LOSS_PCT[$key]=$(calc "100 * ($sent - $rows) / ($sent > 0 ? $sent : 1)" 3)
    DROPS[$key]=$(field "$line" kernel_drops)
    ACHIEVED[$key]=$(calc "$sent / $secs" 0)
    SEND_CPU[$key]=$(calc "100 * $cpu / $secs" 1)
    DAEMON_CPU[$key]=$(calc "100 * ($c1 - $c0) / $CLK_TCK / $wall" 1)
    RECV_CPU[$key]=$(calc "100 * ($r1 - $r0) / $CLK_TCK / $wall" 1)
    PERS_CPU[$key]=$(calc "100 * ($p1 - $p0) / $CLK_TCK / $wall" 1)
    printf '  %-8s %-8s %7s/s rep %d: sent %d, stored %d, loss %d (%s%%), kernel_drops %d; CPU %% sender %s, daemon %s\n' \
        "$store" "$buffer" "$rate" "$rep" "$sent" "$rows" "${LOSS[$key]}" "${LOSS_PCT[$key]}" \
        "${DROPS[$key]}" "${SEND_CPU[$key]}" "${DAEMON_CPU[$key]}" >&2
    cat >>"$WORK/steps.jsonl" <<EOF
    {"store": "$store", "recv_buffer": "$buffer", "granted": ${GRANTED["$store $buffer"]}, "rate": $rate, "rep": $rep, "sent": $sent, "send_failed": $failed, "send_seconds": $secs, "achieved_rate": ${ACHIEVED[$key]}, "rows": $rows, "loss": ${LOSS[$key]}, "loss_pct": ${LOSS_PCT[$key]}, "received": $(field "$line" received), "persisted": $(field "$line" persisted), "kernel_drops": ${DROPS[$key]}, "unread": $(field "$line" unread), "lost": $(field "$line" lost), "exit_status": $status, "sender_cpu_pct": ${SEND_CPU[$key]}, "daemon_cpu_pct": ${DAEMON_CPU[$key]}, "receiver_cpu_pct": ${RECV_CPU[$key]}, "persister_cpu_pct": ${PERS_CPU[$key]}, "measured_seconds": $wall},
EOF
}

# --- the run ----------------------------------------------------------------
reps_of() { [[ $1 == postgres ]] && echo "$PG_REPS" || echo "$REPS"; }
for store in "${STORES[@]}"; do
    case $store in
    sqlite) command -v sqlite3 >/dev/null || die "sqlite3 is needed to count SQLite rows" ;;
    bare) ;;
    postgres) [[ -n "$PG_URL" ]] || pg_start ;;
    *) die "KNEE_STORES: unknown store $store (sqlite, postgres, bare)" ;;
    esac
done
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
MAX_REPS=$REPS
((PG_REPS > MAX_REPS)) && MAX_REPS=$PG_REPS
: >"$WORK/steps.jsonl"
echo "knee of $LABEL: rates ${RATES[*]}/s, ${SECS}s steps, load $LOAD_BEFORE" >&2
for ((rep = 1; rep <= MAX_REPS; rep++)); do
    echo "repetition $rep/$MAX_REPS" >&2
    for store in "${STORES[@]}"; do
        ((rep <= $(reps_of "$store"))) || continue
        for buffer in "${BUFFERS[@]}"; do
            for rate in "${RATES[@]}"; do
                run_step "$store" "$buffer" "$rate" "$rep"
            done
        done
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report -----------------------------------------------------------------
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
join() { local IFS=,; echo "$*"; }
KNEES=()
echo
echo "sensord zero-loss knee: $LABEL, $(nproc) CPUs, $STARTED, ${SECS}s steps, load before/after: $LOAD_BEFORE / $LOAD_AFTER"
for store in "${STORES[@]}"; do
    reps=$(reps_of "$store")
    for buffer in "${BUFFERS[@]}"; do
        echo
        echo "$store, --recv-buffer $buffer (kernel granted ${GRANTED["$store $buffer"]}), $reps repetitions"
        printf '%9s  %-62s %-24s %9s %12s %12s\n' rate "loss per repetition (% of sent)" "kernel_drops" "sent/s" "sender CPU%" "daemon CPU%"
        knee=0 broken="" after=""
        for rate in "${RATES[@]}"; do
            cells=() drops=() sc=() dc=() rc=() pc=() ach=() lossy=0
            for ((rep = 1; rep <= reps; rep++)); do
                k="$store $buffer $rate $rep"
                cells+=("${LOSS[$k]} (${LOSS_PCT[$k]}%)")
                drops+=("${DROPS[$k]}") sc+=("${SEND_CPU[$k]}") dc+=("${DAEMON_CPU[$k]}")
                rc+=("${RECV_CPU[$k]}") pc+=("${PERS_CPU[$k]}") ach+=("${ACHIEVED[$k]}")
                ((LOSS[$k] == 0)) || lossy=1
            done
            if ((lossy)); then
                [[ -n "$broken" ]] || broken=$rate
            elif [[ -z "$broken" ]]; then
                knee=$rate
            elif [[ -z "$after" ]]; then
                after=$rate
            fi
            printf '%9s  %-62s %-24s %9s %12s %12s\n' "$rate" "$(printf '%s / ' "${cells[@]}" | sed 's| / $||')" \
                "$(join "${drops[@]}")" "$(median "${ach[@]}")" "$(median "${sc[@]}")" \
                "$(median "${dc[@]}") ($(median "${rc[@]}")+$(median "${pc[@]}"))"
        done
        if ((knee == 0)); then
            verdict="below ${RATES[0]}/s (loss at every rate measured)"
        elif [[ -z "$broken" ]]; then
            verdict="at least $knee/s (no loss at any rate measured)"
        else
            verdict="$knee/s (first loss at $broken/s)"
        fi
        [[ -z "$after" ]] || verdict+="; zero loss again at $after/s"
        echo "zero-loss knee: $verdict"
        KNEES+=("{\"store\": \"$store\", \"recv_buffer\": \"$buffer\", \"granted\": ${GRANTED["$store $buffer"]}, \"reps\": $reps, \"knee\": $knee, \"first_lossy_rate\": ${broken:-null}, \"verdict\": \"$verdict\"}")
    done
done
echo
echo "CPU% is of one core over the step (send until the socket is read empty); daemon = total (receiver+persister)."

mkdir -p "$(dirname "$OUT")"
{
    cat <<EOF
{
  "date": "$STARTED",
  "sensord": "$LABEL",
  "sensord_path": "$SENSORD",
  "bench_commit": "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)",
  "cpus": $(nproc),
  "load_before": "$LOAD_BEFORE", "load_after": "$LOAD_AFTER",
  "rates": [$(join "${RATES[@]}")], "step_seconds": $SECS, "reps": $REPS, "pg_reps": $PG_REPS,
  "serve_args": "${KNEE_SERVE_ARGS:-}",
  "knees": [$(join "${KNEES[@]}")],
  "steps": [
EOF
    sed '$ s/},$/}/' "$WORK/steps.jsonl"
    echo "  ]"
    echo "}"
} >"$OUT"
echo "written to $OUT"
