"""sensord_client: send numbered readings to sensord over UDP, keep each one
until sensord acknowledges it, and retransmit it until then.

Runs unchanged on CPython 3 and MicroPython, with only socket, json, time,
random and sys. README.md beside this file describes the wire protocol.

    c = Client(("192.168.1.10", 12345), sensor_id="room-3")
    seq = c.send({"temperature": 21.5, "humidity": 40.1})  # None: window full
    c.poll()        # often: reads acks, retransmits, gives up on old ones
    c.flush(10)     # True once every reading is acknowledged
    c.stats         # {"sent", "acked", "retransmitted", "gave_up", "unacked"}
    c.close()
"""

import json
import random
import socket
import sys
import time

# A datagram the client sends is at most this many bytes, so it fits one
# Ethernet frame (no IP fragmentation, which loses whole datagrams).
MAX_DATAGRAM = 1400
# The largest ack read; a longer one is cut, fails to parse, and is ignored
# (the readings it acknowledged are retransmitted and acknowledged again).
ACK_BUFFER = 2048
# A reading's first retransmission timeout, before the random factor.
INITIAL_TIMEOUT_MS = 500
# The timeout doubles per retransmission up to this.
MAX_TIMEOUT_MS = 4000
# A reading not acknowledged this long after its first send is given up.
GIVE_UP_MS = 60000
# sensord tells a late retransmission from a new reading only this far
# below the highest seq it has seen from a sensor and boot.
SERVER_WINDOW = 16384
# The fields the client sets; a reading's values must not use them.
RESERVED = ("sensor_id", "boot", "seq", "ingested_at")

if sys.implementation.name == "micropython":

    def _now():
        return time.ticks_ms()

    def _diff(later, earlier):
        return time.ticks_diff(later, earlier)

    def _add(ticks, ms):
        return time.ticks_add(ticks, ms)

    def _sleep_ms(ms):
        time.sleep_ms(ms)

else:

    def _now():
        return int(time.monotonic() * 1000)

    def _diff(later, earlier):
        return later - earlier

    def _add(ticks, ms):
        return ticks + ms

    def _sleep_ms(ms):
        time.sleep(ms / 1000)


def _epoch_offset_ms():
    """What to add to time.time() for unix time: MicroPython ports whose
    epoch is 2000-01-01 count from there."""
    try:
        if time.gmtime(0)[0] == 2000:
            return 946684800000
    except Exception:
        pass
    return 0


_EPOCH_OFFSET_MS = _epoch_offset_ms()
# Before 2020 the clock has not been set (no NTP yet); after 9999 sensord
# refuses the time. Either way the reading goes without ingested_at, and
# sensord uses the time it arrives.
_SANE_MS = (1577836800000, 253402300799000)


def _unix_ms():
    """Unix time in milliseconds, or None when the clock is not sane."""
    try:
        if hasattr(time, "time_ns"):
            ms = time.time_ns() // 1000000
        else:
            ms = int(time.time()) * 1000
    except Exception:
        return None
    ms += _EPOCH_OFFSET_MS
    if ms < _SANE_MS[0] or ms > _SANE_MS[1]:
        return None
    return ms


def _number(value):
    """Whether `value` is a number JSON can carry (not a bool, NaN or inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value == value and value - value == 0


class Client:
    """One sensor (one sensor_id, one boot) sending to one sensord."""

    def __init__(self, server, sensor_id, boot=None, max_unacked=64, wait_s=5.0):
        """`server` is (host, port). `sensor_id` an int or a name (str).
        `boot` names this run of the firmware; None draws a random 31-bit
        one, so readings of different runs never share an identity.
        `max_unacked` bounds the readings in flight (see send()); `wait_s`
        is how long send() waits for room by default."""
        if isinstance(sensor_id, bool) or not isinstance(sensor_id, (int, str)):
            raise ValueError("sensor_id must be an int or a str")
        if isinstance(sensor_id, str):
            # The server takes "42" as sensor 42 and acks it as 42.
            try:
                if str(int(sensor_id)) == sensor_id:
                    sensor_id = int(sensor_id)
            except ValueError:
                pass
        if not 1 <= max_unacked <= SERVER_WINDOW:
            raise ValueError("max_unacked must be 1..%d" % SERVER_WINDOW)
        if boot is None:
            boot = random.getrandbits(31)
        if isinstance(boot, bool) or not isinstance(boot, int) or boot < 0:
            raise ValueError("boot must be a non-negative int")
        self.sensor_id = sensor_id
        self.boot = boot
        self.max_unacked = max_unacked
        self.wait_s = wait_s
        self._head = '{"sensor_id":%s,"boot":%d,"seq":' % (json.dumps(sensor_id), boot)
        host, port = server
        info = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]
        self._sock = socket.socket(info[0], socket.SOCK_DGRAM)
        # Connected: the socket takes datagrams from the server only.
        self._sock.connect(info[-1])
        self._sock.setblocking(False)
        self._next_seq = 0
        # The lowest seq still pending, or _next_seq when none is.
        self._oldest = 0
        # seq -> [payload, first sent (ticks), next due (ticks), timeout ms]
        self._pending = {}
        # No pending reading is due or expires before these ticks (None when
        # none is pending), so poll() looks at them all only when one may be.
        self._next_check = None
        self._sent = 0
        self._acked = 0
        self._retransmitted = 0
        self._gave_up = 0

    @property
    def stats(self):
        return {
            "sent": self._sent,
            "acked": self._acked,
            "retransmitted": self._retransmitted,
            "gave_up": self._gave_up,
            "unacked": len(self._pending),
        }

    def send(self, values, ingested_at=None, wait_s=None):
        """Numbers, sends and keeps one reading: `values` maps measurement
        names to numbers. `ingested_at` (unix seconds) defaults to the
        clock when it is set. Returns the reading's seq, or None if the
        window stayed full for `wait_s` (default: the client's), in which
        case the reading was not taken and no seq was used.

        The window: a reading waits while its seq is `max_unacked` or more
        above the oldest unacknowledged one, which also bounds how many are
        in flight."""
        seq = self._next_seq
        payload = self._encode(seq, values, ingested_at)
        if not self._wait_for_room(self.wait_s if wait_s is None else wait_s):
            return None
        self._next_seq += 1
        now = _now()
        timeout = INITIAL_TIMEOUT_MS + INITIAL_TIMEOUT_MS * random.getrandbits(16) // 131072
        due = _add(now, timeout)
        self._pending[seq] = [payload, now, due, timeout]
        if self._next_check is None or _diff(due, self._next_check) < 0:
            self._next_check = due
        self._transmit(payload)
        self._sent += 1
        return seq

    def poll(self):
        """Without blocking: reads the acks that arrived, gives up on
        readings older than GIVE_UP_MS, and retransmits the due ones."""
        self._read_acks()
        now = _now()
        if self._next_check is None or _diff(now, self._next_check) < 0:
            return
        due = []
        expired = []
        for seq, entry in self._pending.items():
            if _diff(now, entry[1]) >= GIVE_UP_MS:
                expired.append(seq)
            elif _diff(now, entry[2]) >= 0:
                due.append(seq)
        for seq in expired:
            self._forget(seq)
            self._gave_up += 1
        if due:
            due.sort()
            self._retransmit(due, now)
        self._next_check = None
        for entry in self._pending.values():
            at = entry[2]
            if _diff(entry[1], at) + GIVE_UP_MS < 0:
                at = _add(entry[1], GIVE_UP_MS)
            if self._next_check is None or _diff(at, self._next_check) < 0:
                self._next_check = at

    def flush(self, timeout_s):
        """Polls until every reading is acknowledged (True) or `timeout_s`
        has passed (False)."""
        start = _now()
        while True:
            self.poll()
            if not self._pending:
                return True
            if _diff(_now(), start) >= timeout_s * 1000:
                return False
            _sleep_ms(2)

    def close(self):
        self._sock.close()

    def _encode(self, seq, values, ingested_at):
        parts = [self._head + "%d" % seq]
        if ingested_at is None:
            ms = _unix_ms()
            if ms is not None:
                # Written from integers: a float on a 32-bit MicroPython
                # build would round the time to minutes.
                parts.append('"ingested_at":%d.%03d' % (ms // 1000, ms % 1000))
        elif _number(ingested_at):
            parts.append('"ingested_at":' + json.dumps(ingested_at))
        else:
            raise ValueError("ingested_at must be a number")
        for name in values:
            value = values[name]
            if not isinstance(name, str) or name in RESERVED:
                raise ValueError("bad measurement name: %r" % (name,))
            if not _number(value):
                raise ValueError("%s must be a finite number" % name)
            parts.append(json.dumps(name) + ":" + json.dumps(value))
        payload = (",".join(parts) + "}").encode()
        if len(payload) + 2 > MAX_DATAGRAM:
            raise ValueError("reading longer than %d bytes" % (MAX_DATAGRAM - 2))
        return payload

    def _room(self):
        return self._next_seq - self._oldest < self.max_unacked

    def _wait_for_room(self, wait_s):
        start = _now()
        while not self._room():
            self.poll()
            if self._room():
                break
            if _diff(_now(), start) >= wait_s * 1000:
                return False
            _sleep_ms(2)
        return True

    def _transmit(self, datagram):
        try:
            self._sock.send(datagram)
        except OSError:
            # A full buffer, or an ICMP error from an earlier datagram: as
            # if the network lost it; the timer retransmits.
            pass

    def _retransmit(self, due, now):
        """Sends the `due` readings, as many per datagram (a JSON array) as
        fit, and backs off their timers."""
        batch = []
        size = 2
        for seq in due:
            entry = self._pending[seq]
            if batch and size + 1 + len(entry[0]) > MAX_DATAGRAM:
                self._transmit(b"[" + b",".join(batch) + b"]")
                batch = []
                size = 2
            batch.append(entry[0])
            size += len(entry[0]) + 1
            entry[3] = min(entry[3] * 2, MAX_TIMEOUT_MS)
            entry[2] = _add(now, entry[3])
            self._retransmitted += 1
        self._transmit(b"[" + b",".join(batch) + b"]")

    def _read_acks(self):
        # Bounded, so a flood cannot keep poll() from retransmitting.
        for _ in range(64):
            try:
                data = self._sock.recv(ACK_BUFFER)
            except OSError:
                # Nothing more (EAGAIN), or an ICMP error: either way done.
                return
            self._on_ack(data)

    def _on_ack(self, data):
        """Takes the ranges of `data` that are this sensor's and boot's;
        ignores anything else, malformed or not."""
        try:
            message = json.loads(data.decode())
            entries = message["ack"]
        except Exception:
            return
        if not isinstance(entries, list):
            return
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            sensor_id = entry.get("sensor_id")
            boot = entry.get("boot")
            ranges = entry.get("seq")
            if type(sensor_id) is not type(self.sensor_id) or sensor_id != self.sensor_id:
                continue
            if type(boot) is not int or boot != self.boot or not isinstance(ranges, list):
                continue
            for r in ranges:
                if isinstance(r, list) and len(r) == 2:
                    lo, hi = r
                    if type(lo) is int and type(hi) is int:
                        self._ack_range(lo, hi)

    def _ack_range(self, lo, hi):
        if hi - lo + 1 <= len(self._pending):
            acked = [seq for seq in range(lo, hi + 1) if seq in self._pending]
        else:
            acked = [seq for seq in self._pending if lo <= seq <= hi]
        for seq in acked:
            self._forget(seq)
            self._acked += 1

    def _forget(self, seq):
        del self._pending[seq]
        if seq == self._oldest:
            while self._oldest < self._next_seq and self._oldest not in self._pending:
                self._oldest += 1
