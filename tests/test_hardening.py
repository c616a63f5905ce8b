"""Hardening against a running hub, each with real clients and sockets.

Origin allowlist (403), failed handshakes limited per source address (429), the handshake
timeout (no slowloris), TLS served directly (wss://), permessage-deflate (off by default;
when on, the size limit applies to the inflated message), and 1013 when the hub is
overloaded. In each, a well-behaved device on the same hub is still acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Origin

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer, free_port
from hub.service import HubService
from hub.settings import Settings
from tests.support import HubProcess, add_device, hub_settings, points, running_hub

WAIT_S = 10.0
READING = {"name": "hardening_probe", "time": 1_700_000_000_000, "fields": {"value": 1.0}}
UNKNOWN_TOKEN = "hubt_" + "B" * 43


@dataclass
class Fleet:
    """A running hub with a registered device `dev-bad` and a connected well-behaved one."""

    service: HubService
    settings: Settings
    token: str
    good: DeviceClient

    @property
    def ws_url(self) -> str:
        """The hub's device URL."""
        return f"{self.service.url}/v1/ws"


@contextlib.asynccontextmanager
async def fleet(settings: Settings, **connect: Any) -> AsyncIterator[Fleet]:
    """Start a hub, register both devices, connect the good one (`connect` goes to websockets)."""
    token = add_device(settings, "dev-bad")
    good_token = add_device(settings, "dev-good")
    async with running_hub(settings) as service:
        good = DeviceClient(service.url, good_token)
        await good.connect(**connect)
        try:
            yield Fleet(service, settings, token, good)
        finally:
            await good.close()


async def assert_good_device_still_acked(hub: Fleet) -> None:
    """The well-behaved device's readings are still stored and acked."""
    ack = await asyncio.wait_for(hub.good.store([READING]), WAIT_S)
    assert (ack.accepted, ack.rejected) == (1, [])


async def refused(url: str, **options: Any) -> InvalidStatus:
    """The refusal of a handshake that must not upgrade."""
    with pytest.raises(InvalidStatus) as refusal:
        async with asyncio.timeout(WAIT_S):
            connection = await connect(url, open_timeout=WAIT_S, **options)
            await connection.close()
    return refusal.value


def bearer(token: str) -> dict[str, str]:
    """The Authorization header carrying `token`."""
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def settings(tmp_path: Path, influxdb: LocalServer, influx_db_name: str) -> Settings:
    """Settings writing to a fresh database."""
    return hub_settings(tmp_path, influxdb.url, influx_bucket=influx_db_name, influx_api="v1")


def with_(settings: Settings, **overrides: Any) -> Settings:
    """`settings` with some values changed."""
    return settings.model_copy(update=overrides)


# --- Origin ------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_disallowed_origin_is_refused_with_403(settings: Settings) -> None:
    """A browser handshake from an Origin not on the allowlist gets 403, valid token or not."""
    allowed = with_(settings, allowed_origins=["https://dash.example"])
    async with fleet(allowed) as hub:
        refusal = await refused(
            hub.ws_url, origin=Origin("https://evil.example"), additional_headers=bearer(hub.token)
        )
        assert refusal.response.status_code == 403
        await assert_good_device_still_acked(hub)


@pytest.mark.integration
async def test_any_origin_is_let_in_without_an_allowlist(settings: Settings) -> None:
    """With no allowlist set, Origin is not checked: uwebsockets' `http://localhost` gets in."""
    async with fleet(settings) as hub, asyncio.timeout(WAIT_S):
        connection = await connect(
            hub.ws_url, origin=Origin("http://localhost"), additional_headers=bearer(hub.token)
        )
        await connection.close()
        assert connection.close_code == 1000


@pytest.mark.integration
@pytest.mark.parametrize("origin", ["https://dash.example", None], ids=["allowed", "device"])
async def test_allowed_origin_and_no_origin_connect(settings: Settings, origin: str | None) -> None:
    """An allowed Origin connects, and so does a device, which sends no Origin."""
    allowed = with_(settings, allowed_origins=["https://dash.example"])
    async with fleet(allowed) as hub, asyncio.timeout(WAIT_S):
        connection = await connect(
            hub.ws_url,
            origin=Origin(origin) if origin else None,
            additional_headers=bearer(hub.token),
        )
        await connection.close()
        assert connection.close_code == 1000


@pytest.mark.integration
async def test_star_allows_every_origin(settings: Settings) -> None:
    """allowed_origins = ["*"] lets any browser page connect."""
    async with fleet(with_(settings, allowed_origins=["*"])) as hub, asyncio.timeout(WAIT_S):
        connection = await connect(
            hub.ws_url, origin=Origin("https://any.example"), additional_headers=bearer(hub.token)
        )
        await connection.close()


@pytest.mark.integration
async def test_origin_given_twice_is_refused_with_400(settings: Settings) -> None:
    """Two Origin headers are a bad request (400), not a server error."""
    async with fleet(settings) as hub:
        headers = [("Origin", "https://a.example"), ("Origin", "https://b.example")]
        refusal = await refused(hub.ws_url, additional_headers=headers)
        assert refusal.response.status_code == 400


@pytest.mark.integration
async def test_authorization_given_twice_is_refused_with_400(settings: Settings) -> None:
    """Two Authorization headers are a bad request (400), not a server error."""
    async with fleet(settings) as hub:
        headers = [("Authorization", f"Bearer {hub.token}"), ("Authorization", "Bearer x")]
        refusal = await refused(hub.ws_url, additional_headers=headers)
        assert refusal.response.status_code == 400
        await assert_good_device_still_acked(hub)


# --- Failed handshakes per source address --------------------------------------------------------

GUESSER = "127.0.0.2"  # the loopback network is all ours: a second source address


async def guess(hub: Fleet, token: str = UNKNOWN_TOKEN) -> int:
    """One handshake from GUESSER with `token`; its HTTP status."""
    refusal = await refused(hub.ws_url, additional_headers=bearer(token), local_addr=(GUESSER, 0))
    return refusal.response.status_code


@pytest.mark.integration
async def test_guessing_tokens_is_refused_with_429_after_the_burst(settings: Settings) -> None:
    """After auth_failures_burst failures, wrong tokens from the source get 429 with
    Retry-After, a valid one from it gets in; other addresses are unaffected."""
    limited = with_(settings, auth_failures_burst=3, auth_block_s=60.0)
    async with fleet(limited) as hub:
        assert [await guess(hub) for _ in range(4)] == [401] * 4
        refusal = await refused(
            hub.ws_url, additional_headers=bearer(UNKNOWN_TOKEN), local_addr=(GUESSER, 0)
        )
        assert refusal.response.status_code == 429
        assert 0 < int(refusal.response.headers["Retry-After"]) <= 60
        async with asyncio.timeout(WAIT_S):
            neighbour = await connect(
                hub.ws_url, additional_headers=bearer(hub.token), local_addr=(GUESSER, 0)
            )
            await neighbour.close()
        async with DeviceClient(hub.service.url, hub.token) as device:  # from 127.0.0.1
            assert (await asyncio.wait_for(device.store([READING]), WAIT_S)).accepted == 1
        await assert_good_device_still_acked(hub)


@pytest.mark.integration
async def test_failed_handshakes_are_counted_and_logged_without_the_token(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Failures and the block are counted, and logged with the address but not the token."""
    caplog.set_level(logging.DEBUG)
    limited = with_(settings, auth_failures_burst=2, auth_block_s=60.0)
    async with fleet(limited) as hub:
        statuses = [await guess(hub) for _ in range(3)] + [await guess(hub)]
        counters = hub.service.hub.failed_handshakes.counters
    assert statuses == [401, 401, 401, 429]
    assert (counters.failures, counters.blocks, counters.refused_while_blocked) == (3, 1, 1)
    hub_lines = [r.getMessage() for r in caplog.records if r.name.startswith("hub")]
    assert any(f"handshakes from {GUESSER} refused for 60 s" in line for line in hub_lines)
    assert sum(f"handshake from {GUESSER} refused" in line for line in hub_lines) == 2
    assert not any(UNKNOWN_TOKEN[5:] in line for line in hub_lines)


# --- Handshake timeout ----------------------------------------------------------------------------


async def closed_by_hub(port: int, data: list[bytes], tls: ssl.SSLContext | None = None) -> bytes:
    """Open a TCP connection, send `data` slowly, and return what the hub sent before closing."""
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        received = b""
        with contextlib.suppress(ConnectionError):
            for chunk in data:
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(0.05)
            while chunk := await reader.read(4096):
                received += chunk
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        return received


@pytest.mark.integration
@pytest.mark.parametrize(
    "data",
    [[], [b"GET /v1/ws HTTP/1.1\r\n"], [b"GET /v1/ws HTTP/1.1\r\n", *[b"X-Slow: 1\r\n"] * 200]],
    ids=["silent", "partial_request", "slowloris"],
)
async def test_handshake_that_never_completes_is_closed(
    settings: Settings, data: list[bytes]
) -> None:
    """A client that never finishes its handshake is disconnected after handshake_timeout_s."""
    async with fleet(with_(settings, handshake_timeout_s=0.5)) as hub:
        received = await closed_by_hub(hub.service.hub.port, data)
        assert not received.startswith(b"HTTP/1.1 101")
        await assert_good_device_still_acked(hub)


# --- TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made for this session."""
    directory = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "hub.crt", directory / "hub.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def trusting(cert: Path) -> ssl.SSLContext:
    """A client TLS context that trusts only `cert`."""
    context = ssl.create_default_context(cafile=cert)
    return context


@pytest.mark.integration
async def test_tls_serves_wss_to_a_device(
    settings: Settings, certificate: tuple[Path, Path]
) -> None:
    """With tls_cert and tls_key the hub speaks wss://, and a device is acked over it."""
    cert, key = certificate
    async with fleet(with_(settings, tls_cert=cert, tls_key=key), ssl=trusting(cert)) as hub:
        assert hub.service.url.startswith("wss://127.0.0.1:")
        device = DeviceClient(hub.service.url, hub.token)
        await device.connect(ssl=trusting(cert))
        try:
            assert (await asyncio.wait_for(device.store([READING]), WAIT_S)).accepted == 1
        finally:
            await device.close()
        await assert_good_device_still_acked(hub)


@pytest.mark.integration
async def test_tls_hub_refuses_plain_websocket(
    settings: Settings, certificate: tuple[Path, Path]
) -> None:
    """A plain ws:// client cannot talk to a TLS hub; the hub stays up for wss:// devices."""
    cert, key = certificate
    async with fleet(with_(settings, tls_cert=cert, tls_key=key), ssl=trusting(cert)) as hub:
        plain = f"ws://127.0.0.1:{hub.service.hub.port}/v1/ws"
        with pytest.raises((InvalidHandshake, OSError)):
            async with asyncio.timeout(WAIT_S):
                await connect(plain, additional_headers=bearer(hub.token))
        await assert_good_device_still_acked(hub)


@pytest.mark.integration
async def test_tls_handshake_that_never_starts_is_closed(
    settings: Settings, certificate: tuple[Path, Path]
) -> None:
    """A TCP client that never starts TLS is disconnected after handshake_timeout_s."""
    cert, key = certificate
    tls = with_(settings, tls_cert=cert, tls_key=key, handshake_timeout_s=0.5)
    async with fleet(tls, ssl=trusting(cert)) as hub:
        assert await closed_by_hub(hub.service.hub.port, []) == b""
        await assert_good_device_still_acked(hub)


@pytest.mark.e2e
async def test_tls_from_hub_serve_on_uvloop(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str, certificate: tuple[Path, Path]
) -> None:
    """`hub serve` (uvloop's event loop) serves wss:// too: a device's reading is acked and
    stored. The tests above run the hub in-process, on asyncio's loop."""
    cert, key = certificate
    state = tmp_path / "state"
    token = add_device(hub_settings(state, influxdb.url), "dev-tls")
    hub = HubProcess(
        state, influxdb, influx_db_name, "--tls-cert", str(cert), "--tls-key", str(key)
    )
    async with hub:
        device = DeviceClient(hub.url.replace("ws://", "wss://"), token)
        await device.connect(ssl=trusting(cert))
        try:
            assert (await asyncio.wait_for(device.store([READING]), WAIT_S)).accepted == 1
        finally:
            await device.close()
        assert "on uvloop's event loop" in hub.log, hub.log
    stored = points(influxdb, influx_db_name, str(READING["name"]))
    assert [row["value"] for row in stored] == [1.0]


@pytest.mark.unit
def test_tls_needs_both_cert_and_key(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    """tls_cert without tls_key (or the reverse) is a settings error."""
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        hub_settings(tmp_path, None, tls_cert=certificate[0])


# --- permessage-deflate ---------------------------------------------------------------------------


async def deflate_client(hub: Fleet) -> ClientConnection:
    """A raw client offering permessage-deflate."""
    return await connect(
        hub.ws_url, additional_headers=bearer(hub.token), compression="deflate", max_size=None
    )


@pytest.mark.integration
async def test_compression_is_off_by_default(settings: Settings) -> None:
    """A client offering permessage-deflate gets no compression unless the operator enabled it."""
    async with fleet(settings) as hub, asyncio.timeout(WAIT_S):
        connection = await deflate_client(hub)
        assert connection.protocol.extensions == []
        await connection.close()


@pytest.mark.integration
async def test_size_limit_applies_to_the_inflated_message(settings: Settings) -> None:
    """With compression on, a small frame inflating past max_message_bytes is closed 1009."""
    compressed = with_(settings, compression=True, max_message_bytes=64 * 1024)
    async with fleet(compressed) as hub, asyncio.timeout(WAIT_S):
        connection = await deflate_client(hub)
        assert [e.name for e in connection.protocol.extensions] == ["permessage-deflate"]
        bomb = {"name": "m", "fields": {"text": "x" * 60_000}}
        frame = msgpack.packb({"type": "readings", "seq": 1, "readings": [bomb, bomb]})
        assert len(frame) > 64 * 1024
        await connection.send(frame)
        with contextlib.suppress(ConnectionClosed):
            while True:
                await connection.recv()
        assert connection.close_code == 1009
        await assert_good_device_still_acked(hub)


@pytest.mark.integration
async def test_compressed_messages_are_acked(settings: Settings) -> None:
    """With compression on, a compressed message within the limit is stored and acked."""
    async with fleet(with_(settings, compression=True)) as hub, asyncio.timeout(WAIT_S):
        connection = await deflate_client(hub)
        await connection.send(msgpack.packb({"type": "readings", "seq": 7, "readings": [READING]}))
        while (answer := msgpack.unpackb(await connection.recv()))["type"] != "ack":
            pass
        assert (answer["seq"], answer["accepted"]) == (7, 1)
        await connection.close()


# --- 1013 when the hub is overloaded --------------------------------------------------------------


@pytest.mark.integration
async def test_device_sending_into_a_full_hub_is_closed_with_1013(tmp_path: Path) -> None:
    """While the write pipeline stays full (InfluxDB gone, spool full), a device that keeps
    sending gets error `overloaded`, then close 1013."""
    settings = hub_settings(
        tmp_path,
        f"http://127.0.0.1:{free_port()}",  # nothing listens there
        influx_api="v1",
        spool_max_bytes=1,
        max_pending_readings=1,
        overload_close_s=0.5,
        write_deadline_s=0.2,
        shutdown_timeout_s=1.0,
    )
    token = add_device(settings, "dev-1")
    async with running_hub(settings) as service, asyncio.timeout(WAIT_S):
        url = f"{service.url}/v1/ws"
        async with connect(url, additional_headers=bearer(token)) as connection:
            for seq in (1, 2):
                message = {"type": "readings", "seq": seq, "readings": [READING]}
                await connection.send(msgpack.packb(message))
            messages = []
            with contextlib.suppress(ConnectionClosed):
                while True:
                    messages.append(msgpack.unpackb(await connection.recv()))
        assert [(m["type"], m["code"]) for m in messages] == [("error", "overloaded")]
        assert connection.close_code == 1013
