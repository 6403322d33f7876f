#!/usr/bin/env bash
# Measures rows/s of each sink (benches/sinks.rs): SQLite, and PostgreSQL by
# COPY and by multi-row INSERT against a throwaway PostgreSQL cluster with
# default durability settings. Needs initdb/pg_ctl on PATH (or under
# /usr/lib/postgresql/*/bin); run as root, the server runs as `postgres`.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=$(dirname "$(command -v initdb || ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")
dir=$(mktemp -d /tmp/sensord-bench-pg-XXXXXX)
chmod 0777 "$dir"
as_pg=()
[ "$(id -u)" -eq 0 ] && as_pg=(runuser -u postgres --)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

stop() {
    (cd "$dir" && "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1) || true
    rm -rf "$dir"
}
trap stop EXIT

cd "$dir"
"${as_pg[@]}" "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >/dev/null
"${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start >/dev/null
cd - >/dev/null

SENSORD_BENCH_PG_URL="postgres://postgres@127.0.0.1:$port/postgres" \
    cargo bench --bench sinks -- "$@"
