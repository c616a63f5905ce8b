"""Sinks that write line protocol to InfluxDB: v1 `/write` and v2 through influxdb-client.

A sink only moves one batch and says how it failed; batching, retries and dead letters belong
to the pipeline. Every failure is a `TransientWriteError` (retrying can help) or a
`PermanentWriteError` (the server refused the data itself).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Protocol

import aiohttp
from influxdb_client.client.exceptions import InfluxDBError
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.domain.write_precision import WritePrecision

from hub.core.dialects import Dialect
from hub.errors import ConfigError, PermanentWriteError, TransientWriteError
from hub.options import InfluxOptions

log = logging.getLogger("hub.influx")

# 408 and 429 are the client-side statuses worth a retry; all 5xx are.
_RETRYABLE_4XX = frozenset({408, 429})
# InfluxDB 1.x ends a partial write's error with the count it refused: "... dropped=2".
_DROPPED = re.compile(r"\bdropped=(\d+)\s*$")


class Sink(Protocol):
    """Where batches go."""

    @property
    def name(self) -> str:
        """Which API it writes with."""

    @property
    def dialect(self) -> Dialect:
        """The kind of server, whose rules the lines written to it must follow."""

    async def detect(self) -> None:
        """Learn the kind of server if not known yet; TransientWriteError while unreachable."""

    async def write(self, body: bytes) -> None:
        """Store one batch of newline-separated points with nanosecond timestamps."""

    async def close(self) -> None:
        """Release connections."""


def classify(status: int, reason: str, retry_after: str | None) -> Exception:
    """The write error for an HTTP answer that was not a success."""
    if status >= 500 or status in _RETRYABLE_4XX:
        return TransientWriteError(reason, status, parse_retry_after(retry_after))
    return PermanentWriteError(reason, status, parse_dropped(reason))


def parse_dropped(reason: str) -> int | None:
    """How many points a partial write refused, from InfluxDB's "... dropped=N", or None."""
    match = _DROPPED.search(reason)
    return int(match.group(1)) if match else None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header given in seconds (dates are ignored)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        return None


class V1Sink:
    """InfluxDB 1.x `/write` (database and optional retention policy)."""

    name = "v1"
    dialect = Dialect.INFLUXDB_1  # only InfluxDB 1.x serves this API

    def __init__(self, options: InfluxOptions) -> None:
        assert options.url is not None
        database, _, retention = options.bucket.partition("/")
        self._url = options.url.rstrip("/") + "/write"
        self._params = {"db": database, "precision": "ns"}
        if retention:
            self._params["rp"] = retention
        self._auth: aiohttp.BasicAuth | None = None
        if options.token is not None:
            user, sep, password = options.token.get_secret_value().partition(":")
            if not sep:
                raise ConfigError("for the v1 API, --influx-token is 'user:password'")
            self._auth = aiohttp.BasicAuth(user, password)
        self._timeout = aiohttp.ClientTimeout(total=options.timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def detect(self) -> None:
        """Nothing to learn: the v1 API means InfluxDB 1.x."""

    async def write(self, body: bytes) -> None:
        """POST the batch to `/write`."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, auth=self._auth)
        try:
            async with self._session.post(self._url, params=self._params, data=body) as response:
                if response.status == 204:
                    return
                text = (await response.text(errors="replace"))[:1000]
                raise classify(
                    response.status, _error_text(text), response.headers.get("Retry-After")
                )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransientWriteError(f"{type(exc).__name__}: {exc}"[:500]) from None

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()


class V2Sink:
    """InfluxDB 2.x/3.x/Cloud/1.8+ `/api/v2/write` through influxdb-client's async client."""

    name = "v2"

    def __init__(self, options: InfluxOptions, dialect: Dialect = Dialect.STRICT) -> None:
        self.dialect = dialect
        assert options.url is not None
        self._bucket = options.bucket
        self._org = options.org
        self._url = options.url
        self._token = options.token
        self._timeout_ms = int(options.timeout_s * 1000)
        self._client: InfluxDBClientAsync | None = None

    async def detect(self) -> None:
        """Nothing to learn: the kind of server was given."""

    async def write(self, body: bytes) -> None:
        """Write the batch with `WriteApiAsync.write`."""
        if self._client is None:
            # Created on first use: the async client must be made inside the event loop.
            token = self._token.get_secret_value() if self._token else ""
            self._client = InfluxDBClientAsync(
                url=self._url, token=token, org=self._org, timeout=self._timeout_ms
            )
        try:
            await self._client.write_api().write(
                bucket=self._bucket,
                org=self._org,
                record=body,
                write_precision=WritePrecision.NS,  # type: ignore[arg-type]
            )
        except InfluxDBError as exc:
            status = getattr(exc, "status", None) or getattr(exc.response, "status", None)
            if status is None:
                raise TransientWriteError(str(exc.message)[:500]) from None
            raise classify(int(status), str(exc.message)[:1000], exc.retry_after) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransientWriteError(f"{type(exc).__name__}: {exc}"[:500]) from None

    async def close(self) -> None:
        """Close the client."""
        if self._client is not None:
            await self._client.close()  # type: ignore[no-untyped-call]


async def detect_server(url: str, timeout_s: float = 5.0) -> tuple[str, Dialect]:
    """The write API and the kind of server at `url`, from its `/ping` (and `/`).

    `v1` for InfluxDB before 1.8 (no /api/v2/write), else `v2`. The dialect: InfluxDB 1.x
    for v1; InfluxDB 2.x when `/ping` names an InfluxDB version or build (2.x, 3.x, Cloud,
    1.8+); VictoriaMetrics when its start page says so (its `/ping` names nothing); else
    STRICT, for a server of unknown kind.
    """
    base = url.rstrip("/")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.get(base + "/ping") as response:
                version = response.headers.get("X-Influxdb-Version", "")
                build = response.headers.get("X-Influxdb-Build", "")
            if version or build:
                match = re.match(r"v?1\.(\d+)", version)
                if match and int(match.group(1)) < 8:
                    return "v1", Dialect.INFLUXDB_1
                return "v2", Dialect.INFLUXDB_2
            async with session.get(base + "/") as response:
                start_page = await response.content.read(_START_PAGE_BYTES)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise TransientWriteError(f"cannot reach {url}/ping: {type(exc).__name__}") from None
    if b"VictoriaMetrics" in start_page:
        return "v2", Dialect.VICTORIA_METRICS
    return "v2", Dialect.STRICT


_START_PAGE_BYTES = 4096
"""How much of a server's start page is read to see whether it names VictoriaMetrics."""


class AutoSink:
    """Asks the server which API it speaks (on the first write, until it answers), then
    writes through the matching sink. The hub can start while InfluxDB is down."""

    def __init__(self, options: InfluxOptions) -> None:
        assert options.url is not None
        self._options = options
        self._url = options.url
        self._inner: Sink | None = None

    @property
    def name(self) -> str:
        """`v1` or `v2` once known, else `auto`."""
        return self._inner.name if self._inner else "auto"

    @property
    def dialect(self) -> Dialect:
        """As the detected sink says; STRICT until the server has answered."""
        return self._inner.dialect if self._inner is not None else Dialect.STRICT

    async def detect(self) -> None:
        """Ask `/ping` now; raises TransientWriteError while the server cannot be reached."""
        if self._inner is None:
            api, dialect = await detect_server(self._url)
            self._inner = V1Sink(self._options) if api == "v1" else V2Sink(self._options, dialect)
            log.info(
                "InfluxDB at %s speaks the %s write API; lines follow the %s dialect",
                self._url,
                api,
                dialect.value,
            )

    async def write(self, body: bytes) -> None:
        """Detect if not done yet, then write."""
        await self.detect()
        assert self._inner is not None
        await self._inner.write(body)

    async def close(self) -> None:
        """Close the inner sink."""
        if self._inner is not None:
            await self._inner.close()


async def open_sink(options: InfluxOptions) -> Sink:
    """The sink the options ask for; `auto` asks the server once now, or later if it is away."""
    if options.url is None:
        raise ConfigError("no InfluxDB configured: give --influx-url or HUB_INFLUX_URL")
    if options.api == "v1":
        return V1Sink(options)
    if options.api == "v2":
        # Only to learn the kind of server; not knowing (STRICT) is the cautious answer.
        try:
            _, dialect = await detect_server(options.url)
        except TransientWriteError:
            dialect = Dialect.STRICT
        return V2Sink(options, dialect)
    sink = AutoSink(options)
    try:
        await sink.detect()
    except TransientWriteError as exc:
        log.warning("InfluxDB not reachable yet (%s); will keep asking", exc)
    return sink


def _error_text(body: str) -> str:
    # InfluxDB answers {"error": "..."}; keep the message, not the JSON around it.
    match = re.search(r'"error"\s*:\s*"((?:[^"\\]|\\.)*)"', body)
    if match is None:
        return body.strip()
    try:  # undo the JSON string escapes (\" and the like)
        return str(json.loads(f'"{match.group(1)}"'))
    except ValueError:
        return match.group(1)
