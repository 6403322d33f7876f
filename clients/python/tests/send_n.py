"""Test driver: sends COUNT readings as SENSOR_ID to HOST:PORT with
sensord_client, waits for their acks, and prints one JSON object:
{"stats": {...}, "readings": [[seq, temperature, humidity, ingested_at], ...]}
with the values exactly as sent. Exits 0 only if every reading was acked.

    python3 send_n.py HOST:PORT COUNT SENSOR_ID [MAX_UNACKED [FLUSH_S]]

A SENSOR_ID of digits is sent as an integer, anything else as a name.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sensord_client import Client  # noqa: E402


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    count = int(sys.argv[2])
    sensor_id = int(sys.argv[3]) if sys.argv[3].isdigit() else sys.argv[3]
    max_unacked = int(sys.argv[4]) if len(sys.argv) > 4 else 4096
    flush_s = float(sys.argv[5]) if len(sys.argv) > 5 else 60.0
    client = Client((host, int(port)), sensor_id, max_unacked=max_unacked, wait_s=30)
    readings = []
    for i in range(count):
        # Many significant digits, distinct per reading, so the stored
        # values can be compared bit for bit.
        temperature = 15 + i / 7
        humidity = 30 + i / 13
        ingested_at = 1764150000 + i / 1000
        seq = client.send(
            {"temperature": temperature, "humidity": humidity}, ingested_at=ingested_at
        )
        if seq is None:
            break
        readings.append([seq, temperature, humidity, ingested_at])
        client.poll()
    acked = len(readings) == count and client.flush(flush_s)
    stats = client.stats
    stats["boot"] = client.boot
    client.close()
    print(json.dumps({"stats": stats, "readings": readings}))
    return 0 if acked and stats["gave_up"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
