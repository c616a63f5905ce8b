"""What docs/protocol.md tells firmware authors about the wire, checked on a real hub:
closes the handshake table does not list (1011 after a missed pong, 1002 for an unmasked
frame, 505 for HTTP/1.0), fragmentation (accepted from devices, never sent by the hub), and
the bytes of the msgpack timestamp examples."""

from __future__ import annotations

import asyncio
import re
import socket
import struct
from pathlib import Path

import msgpack
import pytest
from sensorhub import compat, mpack, wsframe
from sensorhub.ws import handshake_request, parse_response_head

from device_sim.local_servers import LocalServer
from hub.registry.sqlite import Registry
from hub.service import HubService
from tests.support import add_device, hub_settings, points, running_hub

pytestmark = pytest.mark.integration

DOC = Path(__file__).parent.parent / "docs" / "protocol.md"
WAIT_S = 10.0


class RawDevice:
    """A device speaking WebSocket by hand over a blocking socket, to break rules on purpose."""

    def __init__(self, service: HubService, token: str, max_payload: int = 200_000) -> None:
        host, port = service.settings.host, service.hub.port
        self.sock = socket.create_connection((host, port), timeout=WAIT_S)
        key = compat.b64encode(compat.random_bytes(16))
        path = "/v1/ws?precision=ns"
        headers = [f"Authorization: Bearer {token}"]
        self.sock.sendall(handshake_request(host, port, path, key, headers))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            assert chunk, "closed during the handshake"
            head += chunk
        parse_response_head(head[:-4], key)
        self.reader = wsframe.FrameReader(max_payload)

    def send(self, data: bytes | bytearray) -> None:
        """Send raw bytes."""
        self.sock.sendall(data)

    def frame(self) -> wsframe.Frame:
        """The next frame from the hub (blocking, bounded by the socket timeout)."""
        while True:
            frame = self.reader.next()
            if frame is not None:
                return frame
            space = self.reader.space()
            count = self.sock.recv_into(space)
            assert count, "connection closed without a close frame"
            self.reader.received(count)

    def close_code(self) -> int:
        """Read frames (ignoring pings) until the hub's close frame; its code."""
        while True:
            frame = self.frame()
            if frame.opcode == wsframe.OP_CLOSE:
                return wsframe.parse_close(frame.payload)[0]

    def close(self) -> None:
        """Drop the socket."""
        self.sock.close()


async def raw_device(service: HubService, token: str) -> RawDevice:
    """A `RawDevice`, connected without blocking the hub's loop."""
    return await asyncio.to_thread(RawDevice, service, token)


async def test_missed_pong_closes_with_1011(tmp_path: Path, influxdb: LocalServer) -> None:
    """A device that never answers the hub's pings is closed with 1011."""
    settings = hub_settings(
        tmp_path / "state", influxdb.url, ping_interval_s=0.2, ping_timeout_s=0.3
    )
    token = add_device(settings, "mute")
    async with running_hub(settings) as service:
        device = await raw_device(service, token)
        try:
            code = await asyncio.to_thread(device.close_code)
        finally:
            device.close()
    assert code == 1011


async def test_unmasked_frame_closes_with_1002(tmp_path: Path, influxdb: LocalServer) -> None:
    """A device frame without a mask is a protocol error: close 1002."""
    settings = hub_settings(tmp_path / "state", influxdb.url)
    token = add_device(settings, "bare")
    async with running_hub(settings) as service:
        device = await raw_device(service, token)
        try:
            payload = msgpack.packb({"type": "readings", "seq": 1, "readings": []})
            device.send(struct.pack(">BB", 0x82, len(payload)) + payload)
            code = await asyncio.to_thread(device.close_code)
        finally:
            device.close()
    assert code == 1002


async def test_http_1_0_is_answered_505(tmp_path: Path, influxdb: LocalServer) -> None:
    """An upgrade request in HTTP/1.0 gets HTTP 505, not a WebSocket."""
    settings = hub_settings(tmp_path / "state", influxdb.url)
    token = add_device(settings, "old")
    async with running_hub(settings) as service:
        reader, writer = await asyncio.open_connection(settings.host, service.hub.port)
        key = compat.b64encode(compat.random_bytes(16)).decode()
        writer.write(
            f"GET /v1/ws HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        await writer.drain()
        async with asyncio.timeout(WAIT_S):
            status = await reader.readline()
        writer.close()
    assert status.split()[1] == b"505", status


async def test_hub_never_fragments_a_large_config(tmp_path: Path, influxdb: LocalServer) -> None:
    """A 60 KB config arrives as one final frame, not in fragments."""
    settings = hub_settings(tmp_path / "state", influxdb.url)
    token = add_device(settings, "big")
    operator = Registry(settings.registry_path)
    try:
        operator.set_config(["big"], updates={"blob": "x" * 60_000})
    finally:
        operator.close()
    async with running_hub(settings) as service:
        device = await raw_device(service, token)
        try:
            frame = await asyncio.to_thread(device.frame)
            config = msgpack.unpackb(bytes(frame.payload))
        finally:
            device.close()
    assert (frame.opcode, frame.fin, frame.truncated) == (wsframe.OP_BINARY, True, False)
    assert frame.length > 60_000 and config["config"]["blob"] == "x" * 60_000


def timestamp_examples() -> list[tuple[bytes, str]]:
    """The (bytes, description) lines of the doc's msgpack timestamp example block."""
    section = DOC.read_text().split("### msgpack timestamps", 1)[1].split("```", 2)[1]
    examples = []
    for line in section.splitlines():
        match = re.match(r"((?:[0-9a-f]{2} )+)\s*(.*)", line)
        if match:
            examples.append((bytes.fromhex(match.group(1)), match.group(2)))
    return examples


async def test_timestamp_examples_mean_what_the_doc_says(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Each example's bytes, sent as a reading's time, are stored at the instant its line
    names (InfluxDB's own nanoseconds), and the other decoders agree."""
    examples = timestamp_examples()
    assert len(examples) == 4
    expected_ns = []
    for data, description in examples:
        instant = re.search(r"22:13:20(\.\d+)?", description)
        assert instant, description
        fraction = instant.group(1) or ""
        ns = 1_700_000_000 * 10**9 + int((fraction[1:] + "0" * 9)[:9])
        stamp = msgpack.unpackb(data)
        assert stamp.to_unix_nano() == ns, description
        assert mpack.decode(data) == mpack.Timestamp(ns // 10**9, ns % 10**9)
        expected_ns.append(ns)
    settings = hub_settings(tmp_path / "state", influxdb.url, influx_bucket=influx_db_name)
    token = add_device(settings, "clock")
    async with running_hub(settings) as service:
        device = await raw_device(service, token)
        try:
            for seq, (data, _) in enumerate(examples):
                reading = b"\x83" + mpack.encode("name") + mpack.encode(f"ts{seq}")
                reading += mpack.encode("time") + data
                reading += mpack.encode("fields") + mpack.encode({"v": 1})
                message = b"\x83" + mpack.encode("type") + mpack.encode("readings")
                message += mpack.encode("seq") + mpack.encode(seq)
                message += mpack.encode("readings") + b"\x91" + reading
                device.send(wsframe.encode_frame(wsframe.OP_BINARY, message, b"abcd"))
                ack = msgpack.unpackb(bytes((await asyncio.to_thread(device.frame)).payload))
                assert (ack["seq"], ack["accepted"]) == (seq, 1), ack
        finally:
            device.close()
    stored = [points(influxdb, influx_db_name, f"ts{seq}")[0]["time"] for seq in range(4)]
    assert stored == expected_ns
