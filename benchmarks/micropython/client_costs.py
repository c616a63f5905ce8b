"""Runs on MicroPython (and CPython): what the client costs in RAM and time.

Printed as `name: value` lines; benchmarks/bench_micropython_client.py runs it on both.
The `# --- step` lines let the WebAssembly port collect garbage (see tests/micropython/run.mjs).
"""

import gc
import time

from sensorhub import HubClient, wsframe
from sensorhub.clock import Clock

try:
    ticks_us = time.ticks_us  # type: ignore[attr-defined]
    ticks_diff = time.ticks_diff  # type: ignore[attr-defined]
except AttributeError:

    def ticks_us() -> int:
        return time.perf_counter_ns() // 1000

    def ticks_diff(later: int, earlier: int) -> int:
        return later - earlier


def mem_alloc() -> int:
    gc.collect()
    return gc.mem_alloc() if hasattr(gc, "mem_alloc") else 0


READINGS = 500
# --- step
base = mem_alloc()
# --- step
client = HubClient("ws://127.0.0.1:1", "t" * 43, clock=Clock(lambda: 1750000000000),
                   max_readings=READINGS, max_frame_bytes=8192)  # fmt: skip
# --- step
after_client = mem_alloc()
# --- step
start = ticks_us()
for n in range(READINGS):
    client.add("environment", {"temperature": 21.5 + n / 100, "humidity": 40.0},
               {"room": "hall"})  # fmt: skip
add_us = ticks_diff(ticks_us(), start)
# --- step
after_readings = mem_alloc()
start = ticks_us()
frames = 0
while True:
    message = client.buffer.next_message(client.clock.resolve)
    if message is None:
        break
    frames += len(message.frame(123456))
build_us = ticks_diff(ticks_us(), start)

# --- step
del client, message
# --- step
payload = bytes(range(256)) * 16  # 4 KiB
start = ticks_us()
for _ in range(50):
    wsframe.mask(payload, b"abcd")
chunked_us = ticks_diff(ticks_us(), start) / 50
start = ticks_us()
out = bytearray(len(payload))
key = b"abcd"
for i in range(len(payload)):
    out[i] = payload[i] ^ key[i & 3]
bytewise_us = ticks_diff(ticks_us(), start)

if hasattr(gc, "mem_alloc"):  # MicroPython only
    print("client_object_bytes: %d" % (after_client - base))
    print("bytes_per_buffered_reading: %d" % ((after_readings - after_client) // READINGS))
print("add_us_per_reading: %d" % (add_us // READINGS))
print("message_build_us_per_reading: %d" % (build_us // READINGS))
print("mask_4KiB_chunked_us: %d" % chunked_us)
print("mask_4KiB_bytewise_us: %d" % bytewise_us)
