#!/usr/bin/env bash
# The dashboard's costs (issue 19), on this machine, release build:
#   api       GET /api/sensors/1/readings?points=1000 on a sensor with
#             API_N readings in its window (SQLite), without and with an
#             extra field in every reading; median of API_REPS, and the
#             number of points returned
#   page      the page's requests one after another (/, its four assets,
#             /api/summary, /api/sensors) against a database of 991 sensors;
#             and headless Chromium's wall time to a rendered table
#             (browser start included)
#   ingest    a blast of INGEST_N datagrams (examples/bench_send) into
#             sensord with --http, into a copy of that database: readings/s
#             from first send to last commit, and readings lost; alternately
#             with no browser and with headless Chromium showing the page
#             (refreshing every 5 s), INGEST_REPS times each
# Prints one line per figure. Needs sqlite3, curl, python3 and chromium.
#
# Usage: scripts/bench-dashboard.sh     (a few minutes)
# Settings: API_N=1000000 API_REPS=5 INGEST_N=1000000 INGEST_REPS=3
set -euo pipefail
cd "$(dirname "$0")/.."

API_N=${API_N:-1000000}
API_REPS=${API_REPS:-5}
INGEST_N=${INGEST_N:-1000000}
INGEST_REPS=${INGEST_REPS:-3}
DEADLINE_SECS=120

cargo build --release --quiet --bin sensord --example bench_send
BIN="${CARGO_TARGET_DIR:-target}/release"
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# serve DB: starts sensord on free ports; sets UDP, HTTP and SERVER.
serve() {
    local log="$WORK/serve.log"
    "$BIN/sensord" serve --bind 127.0.0.1:0 --http 127.0.0.1:0 --db "$1" \
        --stats-interval 0 --recv-buffer 268435456 2>"$log" &
    SERVER=$!
    PIDS+=("$SERVER")
    for _ in $(seq 100); do
        grep -q "listening on" "$log" && grep -q "http on" "$log" && break
        sleep 0.1
    done
    UDP=$(grep -o 'listening on [0-9.:]*' "$log" | cut -d' ' -f3)
    HTTP=$(grep -o 'http on [0-9.:]*' "$log" | cut -d' ' -f3)
}

stop() { kill -INT "$SERVER"; wait "$SERVER" || true; }

metric() { curl -fsS "http://$HTTP/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }

# Waits until nothing is queued and nothing more was persisted for a second
# (the socket buffer empty too).
settled() {
    local last=-1 now
    for _ in $(seq $DEADLINE_SECS); do
        now=$(metric sensord_readings_persisted_total)
        # A gauge prints as `0.0`.
        [[ "$(metric sensord_readings_queued)" == 0* && "$now" == "$last" ]] && return
        last=$now
        sleep 1
    done
}

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# --- api: one sensor with API_N readings, one per 10 ms -------------------
for extra in none co2; do
    db="$WORK/api-$extra.db"
    serve "$db"
    stop
    python3 - "$db" "$API_N" "$extra" <<'EOF'
import sqlite3, sys, time
db, n, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conn = sqlite3.connect(db)
start = time.time() - n * 0.01
conn.executemany(
    "INSERT INTO sensor_measurements (sensor_id, temperature, humidity, ingested_at, received_at, extra) VALUES (1, ?, ?, ?, ?, ?)",
    ((20 + (i % 100) / 10, 40 + (i % 50) / 5, start + i * 0.01, start + i * 0.01,
      None if extra == "none" else '{"co2": %d}' % (400 + i % 300)) for i in range(n)))
conn.commit()
EOF
    serve "$db"
    times=()
    for _ in $(seq "$API_REPS"); do
        t=$(curl -fsS -o "$WORK/readings.json" -w '%{time_total}' \
            "http://$HTTP/api/sensors/1/readings?points=1000")
        times+=("$t")
    done
    read -r readings points < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["readings"], len(d["t"]))' "$WORK/readings.json")
    echo "api: $readings readings (extra: $extra) -> $points points: median $(median "${times[@]}") s (of ${times[*]})"
    stop
done

# --- page: 991 sensors, a million readings --------------------------------
db="$WORK/fleet.db"
serve "$db"
"$BIN/examples/bench_send" "$UDP" 1000000 >/dev/null
settled
for path in / /assets/dashboard.js /assets/dashboard.css /assets/uPlot.iife.min.js \
    /assets/uPlot.min.css /api/summary /api/sensors; do
    curl -fsS -o /dev/null -w "page: GET $path: %{time_total} s, %{size_download} bytes\n" "http://$HTTP$path"
done
start=$(date +%s.%N)
chromium --headless --no-sandbox --disable-gpu --user-data-dir="$WORK/chromium" \
    --virtual-time-budget=5000 --dump-dom "http://$HTTP/" 2>/dev/null | grep -c '<tr data-sensor' >/dev/null
echo "page: headless chromium, start to rendered DOM: $(echo "$(date +%s.%N) - $start" | bc) s"
stop

# --- ingest: a blast with and without the page open ------------------------
rates_closed=() rates_open=() lost_closed=() lost_open=()
for rep in $(seq "$INGEST_REPS"); do
    for mode in closed open; do
        cp "$db" "$WORK/run.db"
        serve "$WORK/run.db"
        if [[ $mode == open ]]; then
            chromium --headless --no-sandbox --disable-gpu --user-data-dir="$WORK/chromium-$rep" \
                --remote-debugging-port=0 "http://$HTTP/" 2>/dev/null &
            PIDS+=("$!")
            browser=$!
            sleep 8
        fi
        before=$(metric sensord_readings_persisted_total)
        t0=$(date +%s.%N)
        sent=$("$BIN/examples/bench_send" "$UDP" "$INGEST_N" | grep -o 'sent=[0-9]*' | cut -d= -f2)
        settled
        persisted=$(( $(metric sensord_readings_persisted_total) - before ))
        last=$(metric sensord_last_commit_timestamp_seconds)
        rate=$(echo "$persisted / ($last - $t0)" | bc)
        if [[ $mode == open ]]; then
            kill "$browser" 2>/dev/null || true
            wait "$browser" 2>/dev/null || true
            rates_open+=("$rate") lost_open+=($((sent - persisted)))
        else
            rates_closed+=("$rate") lost_closed+=($((sent - persisted)))
        fi
        echo "ingest: rep $rep, page $mode: $rate readings/s, lost $((sent - persisted)) of $sent" >&2
        stop
    done
done
echo "ingest, page closed: median $(median "${rates_closed[@]}") readings/s (${rates_closed[*]}), lost ${lost_closed[*]}"
echo "ingest, page open:   median $(median "${rates_open[@]}") readings/s (${rates_open[*]}), lost ${lost_open[*]}"
