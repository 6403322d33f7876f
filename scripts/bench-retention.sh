#!/usr/bin/env bash
# Ingest speed while --retain deletes a large backlog (issue 18).
# Builds release, makes a SQLite file holding BACKLOG readings a day old,
# and on two copies of it sends N readings at full speed (`sensord send
# --interval 0`): once without --retain, once with --retain 1h, which
# deletes the whole backlog meanwhile. Per run it prints the ingest rate
# (readings stored / seconds from the first send to the last commit), how
# long the backlog took to go and so the delete rate, and the file's size.
#
# Usage: scripts/bench-retention.sh   (about a minute)
# Settings (environment): BACKLOG=2000000 N=1000000
set -euo pipefail
cd "$(dirname "$0")/.."
BACKLOG=${BACKLOG:-2000000}
N=${N:-1000000}
cargo build --release -q
bin=${CARGO_TARGET_DIR:-target}/release/sensord
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# The schema, as sensord creates it, then the backlog.
"$bin" serve --bind 127.0.0.1:0 --db "$work/base.db" 2>"$work/base.log" &
until grep -qs "listening on" "$work/base.log"; do sleep 0.1; done
kill -TERM $! && wait $!
sqlite3 "$work/base.db" "
    WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < $BACKLOG - 1)
    INSERT INTO sensor_measurements (sensor_id, temperature, humidity, ingested_at, received_at)
    SELECT 10 + i % 991, 20.5, 0.5, unixepoch() - 86400 + i / 1000.0, unixepoch() - 86400 FROM n;"

size() { du -k "$1"* | awk '{s += $1} END {printf "%.1f MiB", s / 1024}'; }

# Counter NAME of the last stats line in LOG.
counter() { grep "stats:" "$2" | tail -n 1 | grep -o " $1=[0-9]*" | cut -d= -f2; }

run() {
    local name=$1; shift
    local db="$work/$name.db" log="$work/$name.log"
    cp "$work/base.db" "$db"
    local before; before=$(size "$db")
    "$bin" serve --bind 127.0.0.1:0 --db "$db" --stats-interval 100ms "$@" 2>"$log" &
    local pid=$!
    until grep -qs "listening on" "$log"; do sleep 0.1; done
    local port; port=$(grep -o "listening on 127.0.0.1:[0-9]*" "$log" | cut -d: -f2)
    local start; start=$(date +%s.%N)
    "$bin" send --to "127.0.0.1:$port" --interval 0 --count "$N" 2>/dev/null
    # Stored: every accepted reading committed; the kernel may drop some.
    local stored=""
    while true; do
        sleep 0.05
        local accepted persisted queued
        accepted=$(counter accepted "$log"); persisted=$(counter persisted "$log")
        queued=$(counter queued "$log")
        if [[ -n "$persisted" && "$queued" == 0 && "$persisted" == "$accepted" ]]; then
            stored=$persisted; break
        fi
    done
    local ingest_end; ingest_end=$(date +%s.%N)
    local expired_at_end; expired_at_end=$(counter expired "$log")
    if [[ "$*" == *--retain* ]]; then
        until [[ "$(counter expired "$log")" -ge "$BACKLOG" ]]; do sleep 0.1; done
    fi
    local expired_end; expired_end=$(date +%s.%N)
    kill -TERM $pid && wait $pid
    awk -v n="$name" -v s="$stored" -v a="$start" -v b="$ingest_end" -v c="$expired_end" \
        -v e="$expired_at_end" -v bl="$BACKLOG" -v before="$before" -v after="$(size "$db")" \
        -v r="$*" 'BEGIN {
            printf "%-12s ingest %7.0f readings/s (%d stored in %.2f s); expired during ingest %d", n, s / (b - a), s, b - a, e
            if (r ~ /retain/) printf "; backlog of %d gone after %.2f s (%.0f rows/s)", bl, c - a, bl / (c - a)
            printf "; file %s -> %s\n", before, after
        }'
}

run plain
run retaining --retain 1h
