"""The opening handshake against a running hub: every refusal is a plain HTTP answer.

Refusals are checked with a real WebSocket client (websockets raises `InvalidStatus` with
the HTTP response when the server answers anything but 101) or, where the request itself
must be odd, with a hand-written HTTP request on a raw socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer
from hub.registry.sqlite import Registry
from hub.service import HubService
from hub.settings import Settings
from tests.support import add_device, hub_settings, points, running_hub

pytestmark = pytest.mark.integration

WAIT_S = 10.0
DEVICE = "dev-1"
UNKNOWN_TOKEN = "hubt_" + "A" * 43
READING = {"name": "handshake_probe", "time": 1_700_000_000_000, "fields": {"value": 1.5}}


def bearer(token: str) -> dict[str, str]:
    """The Authorization header carrying `token`."""
    return {"Authorization": f"Bearer {token}"}


async def refusal(url: str, headers: dict[str, str] | None = None) -> Response:
    """The HTTP answer to a handshake the hub must refuse; fails the test if it upgrades."""
    try:
        connection = await asyncio.wait_for(
            connect(url, additional_headers=headers, open_timeout=WAIT_S), WAIT_S
        )
    except InvalidStatus as refused:
        return refused.response
    await connection.close()
    pytest.fail(f"the hub upgraded {url}; a refusal was expected")


async def wait_until_live(service: HubService, devices: set[str]) -> None:
    """Wait (bounded) until exactly `devices` have a session on the hub."""
    async with asyncio.timeout(WAIT_S):
        while service.hub.live_devices != devices:
            await asyncio.sleep(0.01)


@pytest.fixture
def settings(tmp_path: Path, influxdb: LocalServer, influx_db_name: str) -> Settings:
    """Hub settings writing to a fresh database."""
    return hub_settings(tmp_path, influxdb.url, influx_bucket=influx_db_name, influx_api="v1")


@pytest.fixture
def token(settings: Settings) -> str:
    """The token of the registered device `dev-1`."""
    return add_device(settings, DEVICE)


@pytest.fixture
def revoked_token(settings: Settings) -> str:
    """The token of a device that was registered and then revoked."""
    revoked = add_device(settings, "dev-revoked")
    registry = Registry(settings.registry_path)
    try:
        registry.revoke("dev-revoked")
    finally:
        registry.close()
    return revoked


@pytest.fixture
async def service(settings: Settings, token: str) -> AsyncIterator[HubService]:
    """A running hub with `dev-1` registered."""
    async with running_hub(settings) as service:
        yield service


def ws_url(service: HubService, query: str = "", path: str = "/v1/ws") -> str:
    """The WebSocket URL of the hub with `path` and an optional query string."""
    return f"{service.url}{path}" + (f"?{query}" if query else "")


# --- 401 -----------------------------------------------------------------------------------

TOKEN_CASES = ["missing", "unknown", "revoked", "unknown_query", "revoked_query", "basic_auth"]


def token_request(
    case: str, service: HubService, revoked_token: str
) -> tuple[str, dict[str, str] | None]:
    """URL and headers of a handshake whose token is bad in the way `case` names."""
    if case == "missing":
        return ws_url(service), None
    if case == "unknown":
        return ws_url(service), bearer(UNKNOWN_TOKEN)
    if case == "revoked":
        return ws_url(service), bearer(revoked_token)
    if case == "unknown_query":
        return ws_url(service, f"token={UNKNOWN_TOKEN}"), None
    if case == "revoked_query":
        return ws_url(service, f"token={revoked_token}"), None
    assert case == "basic_auth"
    return ws_url(service), {"Authorization": "Basic ZGV2LTE6c2VjcmV0"}


@pytest.mark.parametrize("case", TOKEN_CASES)
async def test_bad_token_is_refused_with_401(
    service: HubService, revoked_token: str, case: str
) -> None:
    """A missing, unknown or revoked token (header or query) is answered 401, no upgrade."""
    url, headers = token_request(case, service, revoked_token)
    answer = await refusal(url, headers)
    assert answer.status_code == 401


async def test_401_answers_are_identical(service: HubService, revoked_token: str) -> None:
    """Missing, unknown and revoked tokens get byte-for-byte the same answer (except Date)."""
    answers = []
    for case in TOKEN_CASES:
        url, headers = token_request(case, service, revoked_token)
        answer = await refusal(url, headers)
        visible = sorted((k.lower(), v) for k, v in answer.headers.raw_items() if k != "Date")
        answers.append((answer.status_code, answer.reason_phrase, answer.body, visible))
    assert all(answer == answers[0] for answer in answers), answers
    assert answers[0][2], "the 401 answer should say what is wrong"


# --- 400 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["m", "", "MS", "sec", "h", "1"])
async def test_bad_precision_is_refused_with_400(
    service: HubService, token: str, precision: str
) -> None:
    """A `precision` other than s, ms, us or ns is answered 400, even with a valid token."""
    answer = await refusal(ws_url(service, f"precision={precision}"), bearer(token))
    assert answer.status_code == 400
    assert b"precision" in answer.body


@pytest.mark.parametrize(
    "query",
    ["precision=ms&precision=ms", "precision=s&precision=ns", "token={t}&token={t}"],
)
async def test_repeated_query_parameter_is_refused_with_400(
    service: HubService, token: str, query: str
) -> None:
    """A query parameter given twice is answered 400, even when both values are valid."""
    answer = await refusal(ws_url(service, query.format(t=token)))
    assert answer.status_code == 400


async def test_query_token_differing_from_header_is_refused_with_400(
    service: HubService, settings: Settings, token: str
) -> None:
    """Two valid tokens, one in the query and another in the header, are answered 400."""
    other = add_device(settings, "dev-2")
    answer = await refusal(ws_url(service, f"token={other}"), bearer(token))
    assert answer.status_code == 400


# --- 404 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/v1/ws/", "/v1/wsx", "/v2/ws", "/v1", "/V1/WS"])
async def test_other_path_is_refused_with_404(service: HubService, token: str, path: str) -> None:
    """Any path but /v1/ws is answered 404, even with a valid token."""
    answer = await refusal(ws_url(service, path=path), bearer(token))
    assert answer.status_code == 404


# --- 503 -----------------------------------------------------------------------------------


async def test_draining_hub_refuses_with_503_and_retry_after(
    service: HubService, token: str
) -> None:
    """While the hub drains for shutdown a valid device is answered 503 with Retry-After."""
    service.hub.draining = True
    answer = await refusal(ws_url(service), bearer(token))
    assert answer.status_code == 503
    assert int(answer.headers["Retry-After"]) > 0


async def test_connection_limit_refuses_with_503_and_retry_after(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """With max_connections=1 taken, another valid device is answered 503 with Retry-After."""
    settings = hub_settings(
        tmp_path, influxdb.url, influx_bucket=influx_db_name, influx_api="v1", max_connections=1
    )
    first, second = add_device(settings, "dev-1"), add_device(settings, "dev-2")
    async with running_hub(settings) as service, DeviceClient(service.url, first):
        answer = await refusal(ws_url(service), bearer(second))
        assert answer.status_code == 503
        assert int(answer.headers["Retry-After"]) > 0


async def test_connection_slot_is_freed_when_a_device_leaves(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """With max_connections=1, a device can connect once the previous one has disconnected."""
    settings = hub_settings(
        tmp_path, influxdb.url, influx_bucket=influx_db_name, influx_api="v1", max_connections=1
    )
    first, second = add_device(settings, "dev-1"), add_device(settings, "dev-2")
    async with running_hub(settings) as service:
        async with DeviceClient(service.url, first):
            await wait_until_live(service, {"dev-1"})
        await wait_until_live(service, set())
        async with DeviceClient(service.url, second):
            await wait_until_live(service, {"dev-2"})


async def test_failed_upgrade_does_not_hold_a_connection_slot(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A valid-token request that fails the upgrade (no Upgrade header) frees its slot."""
    settings = hub_settings(
        tmp_path, influxdb.url, influx_bucket=influx_db_name, influx_api="v1", max_connections=1
    )
    token = add_device(settings, "dev-1")
    async with running_hub(settings) as service:
        async with asyncio.timeout(WAIT_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", service.hub.port)
            # A plain GET: authenticated, but no Upgrade, Connection or Sec-WebSocket-* headers.
            request = f"GET /v1/ws HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {token}\r\n\r\n"
            writer.write(request.encode())
            status_line = await reader.readline()
            writer.close()
            await writer.wait_closed()
        assert not status_line.startswith(b"HTTP/1.1 101"), status_line
        async with DeviceClient(service.url, token):
            await wait_until_live(service, {"dev-1"})


# --- Accepted ------------------------------------------------------------------------------


@pytest.mark.parametrize("in_query", [False, True], ids=["header", "query"])
async def test_valid_token_is_accepted(
    service: HubService, influxdb: LocalServer, influx_db_name: str, token: str, in_query: bool
) -> None:
    """A valid token in the Authorization header or the `token` query parameter connects."""
    async with DeviceClient(service.url, token, token_in_query=in_query) as device:
        ack = await asyncio.wait_for(device.store([READING]), WAIT_S)
    assert ack.accepted == 1
    assert [row["device"] for row in points(influxdb, influx_db_name, "handshake_probe")] == [
        DEVICE
    ]


async def test_same_token_in_query_and_header_is_accepted(service: HubService, token: str) -> None:
    """The token in both the query and the header, identical, is not a conflict."""
    async with asyncio.timeout(WAIT_S):
        connection = await connect(
            ws_url(service, f"token={token}"), additional_headers=bearer(token)
        )
        await connection.close()
    assert connection.close_code == 1000


# --- Secrets -------------------------------------------------------------------------------


async def test_query_token_never_reaches_the_hub_log(
    service: HubService, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With DEBUG logging, a session whose token is in the query logs no trace of the token."""
    caplog.set_level(logging.DEBUG)
    async with DeviceClient(service.url, token, token_in_query=True) as device:
        ack = await asyncio.wait_for(device.store([READING]), WAIT_S)
    assert ack.accepted == 1
    # The test's own client logs its request line too; only the hub's side counts.
    hub_records = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    assert any(r.name.startswith("websockets.server") for r in hub_records), "no DEBUG captured"
    leaked = [f"{r.name}: {r.getMessage()}" for r in hub_records if token in r.getMessage()]
    assert leaked == []
