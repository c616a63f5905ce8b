"""Which dialect the hub picks from a server's `/ping` (and start page).

The real InfluxDB 1.6.7 and VictoriaMetrics are asked in tests/test_influx_sinks.py. The
servers the suite cannot run (InfluxDB 1.8, 2.x, 3.x, Cloud, an unknown one) are stood in
for by a small aiohttp server answering `/ping` with the headers each documents; only the
headers matter to the detection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from hub.core.dialects import Dialect
from hub.ingest.sinks import AutoSink, detect_server, open_sink
from hub.options import InfluxOptions
from hub.settings import Settings

pytestmark = pytest.mark.integration


@asynccontextmanager
async def pinged(headers: Mapping[str, str], start_page: str = "") -> AsyncIterator[str]:
    """A server on a free loopback port answering /ping with `headers`; its base URL."""

    async def ping(request: web.Request) -> web.Response:
        return web.Response(status=204, headers=headers)

    async def start(request: web.Request) -> web.Response:
        return web.Response(text=start_page, content_type="text/html")

    app = web.Application()
    app.router.add_get("/ping", ping)
    app.router.add_get("/", start)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"X-Influxdb-Version": "1.7.11", "X-Influxdb-Build": "OSS"}, ("v1", Dialect.INFLUXDB_1)),
        ({"X-Influxdb-Version": "1.8.10", "X-Influxdb-Build": "OSS"}, ("v2", Dialect.INFLUXDB_2)),
        ({"X-Influxdb-Version": "v2.7.4", "X-Influxdb-Build": "OSS"}, ("v2", Dialect.INFLUXDB_2)),
        ({"X-Influxdb-Version": "3.0.1", "X-Influxdb-Build": "Core"}, ("v2", Dialect.INFLUXDB_2)),
        ({"X-Influxdb-Build": "Cloud"}, ("v2", Dialect.INFLUXDB_2)),
        ({}, ("v2", Dialect.STRICT)),
    ],
    ids=["1.7", "1.8", "2.7", "3.0", "cloud", "unknown"],
)
async def test_ping_headers_name_the_dialect(
    headers: dict[str, str], expected: tuple[str, Dialect]
) -> None:
    """An InfluxDB version or build means InfluxDB; before 1.8 the v1 API; nothing: unknown."""
    async with pinged(headers) as url:
        assert await detect_server(url) == expected


async def test_a_start_page_naming_victoria_metrics_means_victoria_metrics() -> None:
    """VictoriaMetrics' /ping names nothing; its start page says what it is."""
    async with pinged({}, "<h2>Single-node VictoriaMetrics</h2>") as url:
        assert await detect_server(url) == ("v2", Dialect.VICTORIA_METRICS)


async def test_auto_sink_is_strict_until_the_server_answers_then_its_dialect(
    tmp_path: Path,
) -> None:
    """Spool-only and not-yet-reached servers get the strict rules; then the server's own."""
    async with pinged({"X-Influxdb-Version": "v2.7.4"}) as url:
        sink = AutoSink(InfluxOptions.of(Settings(state_dir=tmp_path, influx_url=url)))
        assert sink.dialect is Dialect.STRICT
        await sink.detect()
        assert (sink.name, sink.dialect) == ("v2", Dialect.INFLUXDB_2)
        await sink.close()


async def test_a_forced_v2_api_still_learns_the_kind_of_server(tmp_path: Path) -> None:
    """With influx_api=v2 the hub asks /ping only for the dialect."""
    async with pinged({}, "VictoriaMetrics") as url:
        sink = await open_sink(
            InfluxOptions.of(Settings(state_dir=tmp_path, influx_url=url, influx_api="v2"))
        )
        assert (sink.name, sink.dialect) == ("v2", Dialect.VICTORIA_METRICS)
        await sink.close()
