"""An ESP32 running MicroPython sends a reading every INTERVAL_S seconds to
sensord, and retransmits until each is acknowledged.

Copy sensord_client.py and this file (as main.py) to the board, e.g.
    mpremote cp sensord_client.py : + cp example_esp32.py :main.py
and set the constants below. A DHT22 on DHT_PIN gives temperature and
humidity; without one (DHT_PIN = None) the chip's own temperature sensor
is read, on the boards whose esp32 module has raw_temperature().
"""

import time

import network
import ntptime

import sensord_client

WIFI_SSID = "my-network"
WIFI_PASSWORD = "secret"
SERVER = ("192.168.1.10", 12345)
SENSOR_ID = "esp32-kitchen"
INTERVAL_S = 10
DHT_PIN = 4


def connect_wifi():
    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    if not wlan.isconnected():
        wlan.connect(WIFI_SSID, WIFI_PASSWORD)
        for _ in range(200):
            if wlan.isconnected():
                break
            time.sleep_ms(100)
    print("wifi:", wlan.ifconfig())


def set_clock():
    # Without a set clock readings go without ingested_at, and sensord
    # stamps them when they arrive.
    try:
        ntptime.settime()
    except OSError as e:
        print("ntp failed:", e)


def make_reader():
    if DHT_PIN is not None:
        import dht
        import machine

        sensor = dht.DHT22(machine.Pin(DHT_PIN))

        def read():
            sensor.measure()
            return {"temperature": sensor.temperature(), "humidity": sensor.humidity()}

        return read
    import esp32

    def read():
        # raw_temperature() is in Fahrenheit.
        return {"temperature": (esp32.raw_temperature() - 32) / 1.8}

    return read


def main():
    connect_wifi()
    set_clock()
    read = make_reader()
    # A small window: each kept reading costs RAM.
    client = sensord_client.Client(SERVER, SENSOR_ID, max_unacked=32, wait_s=1)
    print("boot", client.boot)
    next_reading = time.ticks_ms()
    while True:
        if time.ticks_diff(time.ticks_ms(), next_reading) >= 0:
            next_reading = time.ticks_add(next_reading, INTERVAL_S * 1000)
            try:
                values = read()
            except OSError as e:
                print("sensor:", e)
            else:
                if client.send(values) is None:
                    print("window full; reading dropped", client.stats)
        # Acks and retransmissions need poll() between readings.
        client.poll()
        time.sleep_ms(50)


main()
