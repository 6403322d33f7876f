"""A stand-in for sensord's acks, for developing a client without the
daemon: it keeps the first copy of each (sensor_id, boot, seq), acks every
datagram's sequenced readings at once as ranges, and can lose datagrams
both ways on purpose. Prints what it holds every few seconds.

    python3 fake_server.py [PORT [LOSS]]      # e.g. 12345 0.2
"""

import json
import random
import socket
import sys
import time


def readings(datagram):
    """The objects of a datagram: an object, an array, or NDJSON."""
    found = []
    for line in datagram.decode().splitlines():
        if line.strip():
            value = json.loads(line)
            found.extend(value if isinstance(value, list) else [value])
    return found


def ack(objects, stored):
    """Stores `objects` and returns the ack for them (None if none had a
    seq), and how many were duplicates."""
    seqs = {}
    duplicates = 0
    for r in objects:
        if not isinstance(r, dict) or "seq" not in r or "sensor_id" not in r:
            continue
        key = (json.dumps(r["sensor_id"]), r.get("boot", 0))
        identity = key + (r["seq"],)
        if identity in stored:
            duplicates += 1
        else:
            stored[identity] = r
        seqs.setdefault(key, (r["sensor_id"], set()))[1].add(r["seq"])
    entries = []
    for (_, boot), (sensor_id, numbers) in seqs.items():
        ranges = []
        for seq in sorted(numbers):
            if ranges and ranges[-1][1] + 1 == seq:
                ranges[-1][1] = seq
            else:
                ranges.append([seq, seq])
        entries.append({"sensor_id": sensor_id, "boot": boot, "seq": ranges})
    return ({"ack": entries} if entries else None), duplicates


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 12345
    loss = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    sock.settimeout(0.5)
    stored = {}
    duplicates = 0
    last = time.monotonic()
    while True:
        try:
            data, source = sock.recvfrom(65535)
        except socket.timeout:
            data = None
        if data is not None and random.random() >= loss:
            try:
                reply, dups = ack(readings(data), stored)
            except ValueError:
                reply, dups = None, 0
            duplicates += dups
            if reply is not None and random.random() >= loss:
                sock.sendto(json.dumps(reply).encode(), source)
        if time.monotonic() - last > 2:
            last = time.monotonic()
            print("stored %d, duplicates %d" % (len(stored), duplicates), flush=True)


if __name__ == "__main__":
    main()
