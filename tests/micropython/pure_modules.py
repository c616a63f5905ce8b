"""Exercises the MicroPython client's pure modules; prints one `label: hex` line each.

Runs unchanged on MicroPython and on CPython: the test compares the two outputs, and the
encodings with the `msgpack` package. No dicts of several keys are printed, since
MicroPython does not keep a dict's insertion order.
"""

import binascii

from sensorhub import HubClient, mpack, policy, wsframe
from sensorhub.buffer import ReadingsBuffer, encode_reading_body
from sensorhub.clock import Clock


def show(label: str, data: bytes | bytearray | memoryview) -> None:
    print(label + ": " + binascii.hexlify(bytes(data)).decode())


VALUES = [
    0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63, 2**64 - 1,
    -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63),
    0.0, 1.5, -2.25, 1e300, "", "a", "x" * 31, "x" * 32, "x" * 300, "Küche 温度",
    b"", b"\x00\xff", b"z" * 300, [], [1, [2, [3]]], list(range(20)), {}, {"k": {"n": None}},
    True, False, None,
]  # fmt: skip
for index, value in enumerate(VALUES):
    packed = mpack.encode(value)
    show("encode %d" % index, packed)
    assert mpack.decode(packed) == value, index

for seconds, nanoseconds in ((0, 0), (1700000000, 0), (1700000000, 250000000), (2**34, 1), (-1, 5)):
    packed = mpack.encode(mpack.Timestamp(seconds, nanoseconds))
    show("timestamp %d %d" % (seconds, nanoseconds), packed)
    assert mpack.decode(packed) == mpack.Timestamp(seconds, nanoseconds)

key = b"\x01\x80\x7f\xfe"
for size in (0, 1, 3, 4, 255, 256, 257, 1000):
    payload = bytes(i % 251 for i in range(size))
    show("frame %d" % size, wsframe.encode_frame(wsframe.OP_BINARY, payload, key))

reader = wsframe.FrameReader(16)
stream = b"\x82\x03abc\x89\x02hi\x82\x14" + b"y" * 20 + b"\x82\x01z"
for start in range(0, len(stream), 5):
    reader.feed(stream[start : start + 5])
    while True:
        frame = reader.next()
        if frame is None:
            break
        show("read %d %d %d" % (frame.opcode, frame.length, frame.truncated), frame.payload)

buffer = ReadingsBuffer(10, 4, 16384)
for n in range(6):
    entries, body = encode_reading_body("env", {"n": n}, None)
    buffer.add(entries, body, 1750000000000 + n, 0)
while True:
    message = buffer.next_message(lambda unix_ms, ticks: unix_ms)
    if message is None:
        break
    show("message", message.frame(2**33))

prefix, prefix_complete = mpack.decode_map_prefix(mpack.encode({"type": "ack"})[:-1])
print("prefix: %d %s" % (len(prefix), prefix_complete))

print("policy 4001: %s %d" % policy.after_close(4001))
print("policy 1009: %s %d" % policy.after_close(1009))
print("policy 503: %s %d" % policy.after_refusal(503, 5))
backoff = policy.backoff_ms(3, 1000, 4000, 2)
print("backoff in range: %s" % (2000 <= backoff <= 6000))

clock = Clock(lambda: 946684800000)
print("clock unset: %s" % (clock.now_ms() is None))
client = HubClient("ws://127.0.0.1:1", "t" * 32, clock=clock, max_batch=2)
client.add("env", {"t": 21.5}, {"room": "hall"})
client.add("env", {"t": 22.5}, time_ms=1750000000000)
print("held: %d" % client.buffer.held())
made = client.buffer.next_message(
    lambda unix_ms, ticks: 1750000000000 if unix_ms is None else unix_ms
)
assert made is not None
show("client message", made.frame(1))
print("done")
