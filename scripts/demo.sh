#!/usr/bin/env bash
# Starts sensord's server and client together on loopback, against
# ./sensors.db in the current folder, with the dashboard on
# http://127.0.0.1:9108/ (loopback only). Ctrl-C stops both; the server's
# final flush and summary are shown, then `sensord stats` of the database.
#
# Environment: DEMO_SECONDS=N stops by itself after N seconds;
# DEMO_PORT (default 12345); DEMO_HTTP_PORT (default 9108); DEMO_DB
# (default sensors.db); SENSORD_BIN runs that binary instead of building
# one (the tests do).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
port="${DEMO_PORT:-12345}"
http_port="${DEMO_HTTP_PORT:-9108}"
db="${DEMO_DB:-sensors.db}"

if [[ -n "${SENSORD_BIN:-}" ]]; then
    bin="$SENSORD_BIN"
else
    echo "demo: building sensord (release; the first build takes a few minutes)"
    cargo build --release --manifest-path "$root/Cargo.toml"
    bin="${CARGO_TARGET_DIR:-$root/target}/release/sensord"
fi

# Own sessions, so the terminal's Ctrl-C reaches only this script, which
# then sends each process exactly one SIGINT (a second one would make the
# server abandon its final flush).
setsid "$bin" serve --bind "127.0.0.1:$port" --http "127.0.0.1:$http_port" --db "$db" \
    --stats-interval 2s &
server=$!
sleep 0.5
if ! kill -0 "$server" 2>/dev/null; then
    wait "$server" || true
    echo "demo: the server did not start (see above)" >&2
    exit 1
fi
# Twenty sensors, so each one's charts fill up quickly.
setsid "$bin" send --to "127.0.0.1:$port" --sensor-ids 1-20 &
client=$!

stop() {
    trap '' INT TERM
    echo
    echo "demo: stopping client and server"
    kill -INT "$client" 2>/dev/null || true
    wait "$client" || true
    kill -INT "$server" 2>/dev/null || true
    status=0
    wait "$server" || status=$?
    echo "demo: server exited with status $status"
    echo
    "$bin" stats --db "$db" --limit 10
    echo
    echo "demo: all of it: $bin stats --db $db; or sqlite3 $db"
    exit "$status"
}
trap stop INT TERM

echo "demo: open the dashboard: http://127.0.0.1:$http_port/"
if [[ -n "${DEMO_SECONDS:-}" ]]; then
    sleep "$DEMO_SECONDS" &
    wait $! || true
else
    echo "demo: readings are flowing into $db; press Ctrl-C to stop"
    wait "$client" || true
fi
stop
