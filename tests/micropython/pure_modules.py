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

# The WebSocket shell's pure parts, and the client's handling of hub messages, without a
# socket (this port has none).
from sensorhub.ws import WebSocket, handshake_request, parse_response_head, split_url  # noqa: E402

print("url: %s %s %d %s" % split_url("wss://hub.example:8443/v1/ws?precision=ms"))
print("url: %s %s %d %s" % split_url("ws://[::1]:8765/v1/ws"))
key = b"dGhlIHNhbXBsZSBub25jZQ=="
show("request", handshake_request("h", 1, "/v1/ws", key, ["Authorization: Bearer x"]))
head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
head += b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455's example
try:
    parse_response_head(head, key)
    print("accepted")
except OSError as error:
    print("refused: %s" % error)
try:
    parse_response_head(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5", key)
except OSError as error:
    print("refused: %d %s" % (error.status, error.retry_after_s))  # type: ignore[attr-defined]

received: list[tuple[int, bytes, bool]] = []


def on_message(opcode: int, payload: memoryview, truncated: bool) -> None:
    received.append((opcode, bytes(payload), truncated))


class Sink:
    """Stands in for a socket that takes everything written to it."""

    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: memoryview) -> int:
        self.written.extend(data)
        return len(data)

    send = write

    def close(self) -> None:
        pass


ws = WebSocket(64)
sink = Sink()
ws.sock = sink
ws.reader.feed(b"\x89\x02hi" + b"\x02\x03abc" + b"\x80\x02de" + b"\x82\x01z")
ws._frames(on_message)
print("pending after ping: %d" % ws.pending())
ws._write()
print("written: %d bytes, pong %s" % (len(sink.written), sink.written[0] == 0x8A))
for opcode, payload, truncated in received:
    show("payload %d %d" % (opcode, truncated), payload)
ws.reader.feed(b"\x88\x02\x0f\xa1")
ws._frames(on_message)
print("closed: %s, close echoed %s" % (ws.close_code, sink.written[-8] == 0x88))

client = HubClient("ws://127.0.0.1:1", "t" * 32, clock=Clock(lambda: 1750000000000), max_batch=10)
for n in range(10):
    client.add("env", {"n": n})
made = client.buffer.next_message(client.clock.resolve)
assert made is not None
made.sent, made.seq = True, 5
client.ws = WebSocket(1024)
client._on_message(2, memoryview(mpack.encode({"type": "ack", "seq": 5, "accepted": 7,
                   "rejected": [{"index": 1, "errors": ["x"], "count": 3}]})), False)  # fmt: skip
print("acked %d rejected %d held %d" % (client.acked, client.rejected, client.buffer.held()))
applied: list[int] = []
client.on_config = lambda config, version: applied.append(version)
client._on_message(2, memoryview(mpack.encode({"type": "config", "version": 3,
                   "config": {"k": 1}})), False)  # fmt: skip
client._on_message(2, memoryview(mpack.encode({"type": "config", "version": 3,
                   "config": {"k": 1}})), False)  # fmt: skip
print("applied %s, queued %d" % (applied, client.ws.pending()))
client._on_message(2, memoryview(b"\x83\xa4type\xa6config\xa7version\x04"), True)
print("config_version %d answer %s" % (client.config_version, client._config_answer))
print("done")
