#!/usr/bin/env bash
# How fast readers are on a large database (issue 4): fills a SQLite file
# with BENCH_QUERIES_N readings through sensord's own store (sorted batches
# of 250,000; 991 sensors reporting once a second), then measures
#   fill    readings/s of the fill itself (one thread, nothing else running)
#   range   one sensor over a one-hour window within that sensor's readings
#           (about 3,600 rows): median, 95th percentile and worst of
#           BENCH_QUERIES_RANGES queries
#   stats   `sensord stats` on the whole file, run end to end: median of 3
#
# Usage: scripts/bench-queries.sh     (about 30 s at the default 10 million)
# Settings: BENCH_QUERIES_N=10000000, BENCH_QUERIES_RANGES=200,
#           BENCH_QUERIES_DB=path (keep the file, or reuse one: it gets
#           synthetic readings up to N, none if it holds N already; default:
#           a temporary one, removed at exit). CARGO_TARGET_DIR is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${BENCH_QUERIES_N:-10000000}
RANGES=${BENCH_QUERIES_RANGES:-200}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
DB=${BENCH_QUERIES_DB:-$WORK/queries.db}

echo "building (release)..." >&2
cargo build --release --quiet --bin sensord --example bench_queries
BIN="${CARGO_TARGET_DIR:-target}/release"

echo "filling $DB to $N readings, then $RANGES range queries..." >&2
OUT=$("$BIN/examples/bench_queries" "$DB" "$N" "$RANGES")
field() { grep -o "$1=[0-9.]*" <<<"$OUT" | cut -d= -f2; }

STATS=()
for _ in 1 2 3; do
    t0=$(date +%s.%N)
    "$BIN/sensord" stats --db "$DB" >/dev/null
    STATS+=("$(awk "BEGIN { printf \"%.2f\", $(date +%s.%N) - $t0 }")")
done
median=$(printf '%s\n' "${STATS[@]}" | sort -g | sed -n 2p)

echo
echo "sensord query benchmark: $N readings, $(du -m "$DB" | cut -f1) MiB file, $(nproc) CPUs, $(date -u +%Y-%m-%dT%H:%MZ)"
if [[ -n "$(field filled)" ]]; then
    printf '%-50s %s\n' "fill, sorted 250,000-reading batches (readings/s)" \
        "$(awk "BEGIN { printf \"%d\", $(field filled) / $(field seconds) }")"
fi
printf '%-50s %s\n' "one sensor, one hour: rows (median)" "$(field rows_median)"
printf '%-50s %s\n' "  time, median / p95 / max (ms)" "$(field ms_median) / $(field ms_p95) / $(field ms_max)"
printf '%-50s %s\n' "sensord stats, whole file (s, median of 3)" "$median"
printf '%-50s %s\n' "  each run (s)" "$(IFS=,; echo "${STATS[*]}")"
