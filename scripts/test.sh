#!/usr/bin/env bash
# The test command: makes sure what the tests need is here, then runs every
# test. The PostgreSQL tests start throwaway PostgreSQL 15 clusters of their
# own; they need the server binaries (initdb, pg_ctl, postgres) and, when
# run as root, the unprivileged `postgres` user to run them as. Missing
# binaries are installed from Debian's packages (as root), never skipped;
# so are Prometheus and systemd-analyze for the ops tests, Chromium for
# the dashboard's and Python 3 for the Python client's.
#
# Extra arguments go to `cargo test`, e.g. `scripts/test.sh hardening::`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v initdb >/dev/null || ! command -v pg_ctl >/dev/null; then
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$pg_bin" ]; then
        if [ "$(id -u)" -ne 0 ]; then
            echo "test.sh: PostgreSQL server binaries not found; install postgresql-15 (or run as root to have it installed)" >&2
            exit 1
        fi
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq postgresql-15 >/dev/null || apt-get install -y -qq postgresql >/dev/null
        pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    export PATH="$pg_bin:$PATH"
fi
if [ "$(id -u)" -eq 0 ] && ! id -u postgres >/dev/null 2>&1; then
    useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

# The ops tests run Debian's Prometheus (prometheus, promtool) and
# systemd-analyze (from systemd) on the shipped unit file; the dashboard
# tests render the page in headless Chromium; the Python client's tests run
# clients/python under python3.
missing=()
command -v python3 >/dev/null || missing+=(python3)
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "test.sh: ${missing[*]} not found; install them (or run as root to have them installed)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: the Prometheus server and promtool, without
    # the exporters and web assets it recommends.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

exec cargo test --features failpoints "$@"
