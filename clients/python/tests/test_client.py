"""Unit tests of sensord_client under CPython, against a socket the test
reads and answers by hand. Run: python3 -m unittest discover clients/python/tests
"""

import json
import os
import socket
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sensord_client  # noqa: E402
from sensord_client import Client  # noqa: E402


class ClientTest(unittest.TestCase):
    def setUp(self):
        self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server.bind(("127.0.0.1", 0))
        self.server.settimeout(5)
        self.client = Client(self.server.getsockname(), sensor_id="s", boot=7, max_unacked=4)

    def tearDown(self):
        self.client.close()
        self.server.close()

    def receive(self):
        data, self.source = self.server.recvfrom(65535)
        return json.loads(data)

    def reply(self, message):
        raw = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.server.sendto(raw, self.source)
        time.sleep(0.05)
        self.client.poll()

    def test_reading_carries_identity_and_values(self):
        """A reading has sensor_id, boot, seq from 0, the values as given
        and ingested_at from the clock."""
        self.assertEqual(self.client.send({"temperature": 21.5, "co2": 400}), 0)
        reading = self.receive()
        self.assertEqual(
            {k: reading[k] for k in ("sensor_id", "boot", "seq", "temperature", "co2")},
            {"sensor_id": "s", "boot": 7, "seq": 0, "temperature": 21.5, "co2": 400},
        )
        self.assertLess(abs(reading["ingested_at"] - time.time()), 5)
        self.assertEqual(self.client.send({"temperature": 1}, ingested_at=1.5e9), 1)
        self.assertEqual(self.receive()["ingested_at"], 1.5e9)

    def test_ack_ranges_remove_only_own_readings(self):
        """Ranges for another sensor, boot or id type, and malformed acks,
        change nothing; the own ranges acknowledge their seqs."""
        for _ in range(4):
            self.client.send({"temperature": 1})
            self.receive()
        for foreign in (
            b"not json",
            b'{"ack": 5}',
            {"ack": [{"sensor_id": "t", "boot": 7, "seq": [[0, 3]]}]},
            {"ack": [{"sensor_id": "s", "boot": 8, "seq": [[0, 3]]}]},
            {"ack": [{"sensor_id": "s", "boot": 7, "seq": [[0, "3"], [1]]}]},
            {"ack": [{"sensor_id": "s", "seq": [[0, 3]]}]},
        ):
            self.reply(foreign)
        self.assertEqual(self.client.stats["unacked"], 4)
        self.reply({"ack": [{"sensor_id": "s", "boot": 7, "seq": [[0, 1], [3, 3]]}]})
        self.assertEqual(self.client.stats["acked"], 3)
        self.reply({"ack": [{"sensor_id": "s", "boot": 7, "seq": [[0, 9]]}]})
        self.assertEqual(self.client.stats, {
            "sent": 4, "acked": 4, "retransmitted": 0, "gave_up": 0, "unacked": 0})

    def test_window_blocks_until_the_oldest_is_acked(self):
        """With max_unacked=4, seq 4 waits for seq 0 even if 1..3 are
        acked: the window is a span of seqs, as sensord's."""
        for _ in range(4):
            self.client.send({"temperature": 1})
            self.receive()
        self.reply({"ack": [{"sensor_id": "s", "boot": 7, "seq": [[1, 3]]}]})
        self.assertIsNone(self.client.send({"temperature": 1}, wait_s=0.2))
        self.reply({"ack": [{"sensor_id": "s", "boot": 7, "seq": [[0, 0]]}]})
        self.assertEqual(self.client.send({"temperature": 1}, wait_s=0.2), 4)

    def test_retransmits_unchanged_with_backoff_and_gives_up(self):
        """An unacked reading comes again, byte for byte, after 0.5-0.75 s
        then after twice that; it is given up after GIVE_UP_MS."""
        start = time.monotonic()
        self.client.send({"temperature": 1.25})
        first, _ = self.server.recvfrom(65535)
        times = []
        for _ in range(2):
            while True:
                self.client.poll()
                self.server.settimeout(0.01)
                try:
                    again, _ = self.server.recvfrom(65535)
                    break
                except socket.timeout:
                    pass
            times.append(time.monotonic() - start)
            self.assertEqual(again, b"[" + first + b"]")
        self.assertTrue(0.49 <= times[0] <= 0.8, times)
        self.assertTrue(1.45 <= times[1] <= 2.3, times)
        old = sensord_client.GIVE_UP_MS
        sensord_client.GIVE_UP_MS = 0
        try:
            self.client._next_check = sensord_client._now()
            self.client.poll()
        finally:
            sensord_client.GIVE_UP_MS = old
        self.assertEqual(self.client.stats["gave_up"], 1)
        self.assertEqual(self.client.stats["unacked"], 0)
        self.assertTrue(self.client.flush(0))

    def test_bad_values_are_refused(self):
        for values in ({"seq": 1}, {"t": float("nan")}, {"t": True}, {"t": "x"}):
            with self.assertRaises(ValueError):
                self.client.send(values)
        self.assertEqual(self.client.stats["sent"], 0)


if __name__ == "__main__":
    unittest.main()
