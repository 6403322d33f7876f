#!/usr/bin/env bash
# Takes the README's pictures, docs/dashboard.png and docs/sensor.png, with
# headless Chromium from a demo run: twenty sensors sending every 10 ms
# (sequenced, as `sensord send` does), one that lost some readings on the
# way, and one silent for ten minutes.
#
# Usage: scripts/screenshots.sh   (about SHOT_SECONDS, default 180, plus a build)
# Environment: SHOT_SECONDS; SENSORD_BIN runs that binary instead of building.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [[ -n "${SENSORD_BIN:-}" ]]; then
    bin="$SENSORD_BIN"
else
    cargo build --release --quiet --bin sensord
    bin="${CARGO_TARGET_DIR:-target}/release/sensord"
fi
chromium=$(command -v chromium || command -v chromium-browser || true)
[[ -n "$chromium" ]] || { echo "screenshots: chromium is not installed (apt-get install chromium)" >&2; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$bin" serve --bind 127.0.0.1:0 --http 127.0.0.1:0 --db "$work/sensors.db" 2>"$work/serve.log" &
pids+=($!)
for _ in $(seq 100); do grep -q 'http on ' "$work/serve.log" && break; sleep 0.1; done
udp=$(grep -o 'listening on [0-9.:]*' "$work/serve.log" | cut -d' ' -f3)
http=$(grep -o 'http on [0-9.:]*' "$work/serve.log" | cut -d' ' -f3)
"$bin" send --to "$udp" --sensor-ids 1-20 2>/dev/null &
pids+=($!)
# "cellar" skips every seventh seq (lost on the way); "attic" was last
# heard from ten minutes ago.
python3 - "$udp" "${SHOT_SECONDS:-180}" <<'PY'
import json, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
to = (host, int(port))
s.sendto(json.dumps({"sensor_id": "attic", "temperature": 4.5, "humidity": 81,
                     "ingested_at": time.time() - 600}).encode(), to)
end = time.time() + float(sys.argv[2])
seq = 0
while time.time() < end:
    if seq % 7 != 3:
        s.sendto(json.dumps({"sensor_id": "cellar", "boot": 1, "seq": seq,
                             "temperature": 11 + (seq % 60) / 30, "humidity": 70 + (seq % 40) / 10,
                             "co2": 600 + seq % 90}).encode(), to)
    seq += 1
    time.sleep(0.2)
PY
shot() {
    "$chromium" --headless --no-sandbox --disable-gpu --hide-scrollbars \
        --user-data-dir="$work/profile" --window-size=1200,"$2" \
        --virtual-time-budget=8000 --screenshot="$1" "$3" 2>/dev/null
}
shot docs/dashboard.png 1250 "http://$http/"
shot docs/sensor.png 1250 "http://$http/#sensor=cellar&window=900"
echo "screenshots: wrote docs/dashboard.png and docs/sensor.png"
