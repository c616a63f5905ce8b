# main.py for a MicroPython board: read a sensor and stream it to a sensor-hub.
# Copy with: mpremote mkdir :lib + cp -r sensorhub :lib/ + cp main.py : + cp settings.py :
# settings.py (yours, not in git) holds WIFI_SSID, WIFI_PASSWORD, HUB_URL, HUB_TOKEN.

import time

import machine
import network
import settings
from sensorhub import HubClient

SAMPLE_MS = 5000  # changed by a pushed config {"interval_s": N}


def connect_wifi():
    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    if not wlan.isconnected():
        wlan.connect(settings.WIFI_SSID, settings.WIFI_PASSWORD)
        for _ in range(100):
            if wlan.isconnected():
                break
            time.sleep_ms(100)
    return wlan.isconnected()


def read_temperature():
    # The RP2040's internal sensor (ADC 4); on an ESP32 read your own sensor here instead,
    # e.g. a DS18B20 or BME280 driver.
    raw = machine.ADC(4).read_u16() * 3.3 / 65535
    return 27 - (raw - 0.706) / 0.001721


def on_config(config, version):
    global SAMPLE_MS
    interval = config.get("interval_s", SAMPLE_MS // 1000)
    if not isinstance(interval, (int, float)) or interval < 1:
        return "interval_s must be a number >= 1"
    SAMPLE_MS = int(interval * 1000)
    return None  # applied


connect_wifi()
client = HubClient(settings.HUB_URL, settings.HUB_TOKEN, on_config, max_readings=500)
client.clock.sync()  # NTP; readings sampled before it get their time once it is set
next_sample = time.ticks_ms()
while client.stopped is None:
    if time.ticks_diff(time.ticks_ms(), next_sample) >= 0:
        next_sample = time.ticks_add(next_sample, SAMPLE_MS)
        client.add("environment", {"temperature": read_temperature()}, {"room": "hall"})
        if client.clock.now_ms() is None:
            client.clock.sync()
    if not connect_wifi():
        time.sleep_ms(1000)
        continue
    # Serve the socket until the next sample: sends, acks, pings, config.
    client.poll(max(10, time.ticks_diff(next_sample, time.ticks_ms())))
print("hub stopped this device:", client.stopped)
