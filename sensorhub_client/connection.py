"""One protocol v1 connection (`DeviceClient`), built on the `schemas` models.

The low layer of the public client: it pipelines (`send_readings` returns as soon as the
frame is out, and the ack arrives on the returned future, matched by order: the hub acks in
the order it received) and answers config pushes. It does not reconnect: that is
`sensorhub_client.StreamingClient`, built on it, and the simulator's devices.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import msgpack
from pydantic import BaseModel
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from schemas.codes import WEBSOCKET_PATH
from schemas.messages import Ack, Config, ConfigAck, ErrorMessage, Reading, Rejection

Precision = Literal["s", "ms", "us", "ns"]
ConfigHandler = Callable[[Config], Awaitable[str | None]]
"""Applies a pushed config; returns None when applied, else the reason it was refused."""


def pack(message: BaseModel | dict[str, Any]) -> bytes:
    """A message as the one msgpack map of a binary frame."""
    data = message.model_dump(exclude_none=True) if isinstance(message, BaseModel) else message
    packed: bytes = msgpack.packb(data, use_bin_type=True, datetime=False)
    return packed


def parse_ack(message: dict[str, Any]) -> Ack:
    """An `ack` as the model, ignoring keys it does not know in the message and in its
    `rejected` entries (a later hub may add some; the contract tells devices to ignore them).
    `Ack.rejected_indices()` names every rejected reading, `rejected_ranges` included.
    """
    rejected = [
        Rejection(index=entry["index"], errors=entry.get("errors") or [])
        for entry in message.get("rejected") or []
        if isinstance(entry, dict) and isinstance(entry.get("index"), int)
    ]
    ranges = [
        (entry[0], entry[1])
        for entry in message.get("rejected_ranges") or []
        if isinstance(entry, list | tuple)
        and len(entry) == 2
        and all(isinstance(bound, int) for bound in entry)
    ]
    return Ack(
        seq=message["seq"],
        accepted=message["accepted"],
        rejected=rejected,
        rejected_ranges=ranges,
    )


def device_url(base: str, precision: Precision | None = None, token: str | None = None) -> str:
    """The hub URL a device connects to, from `ws://host:port`."""
    url = base.rstrip("/")
    if not url.endswith(WEBSOCKET_PATH):
        url += WEBSOCKET_PATH
    query = [f"precision={precision}"] if precision else []
    if token is not None:
        query.append(f"token={token}")
    return url + ("?" + "&".join(query) if query else "")


class DeviceClient:
    """One device connection: send readings, receive acks, answer config pushes."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        precision: Precision | None = None,
        token_in_query: bool = False,
        on_config: ConfigHandler | None = None,
    ) -> None:
        self.url = device_url(url, precision, token if token_in_query else None)
        self._headers = None if token_in_query else {"Authorization": f"Bearer {token}"}
        self._on_config = on_config
        self._connection: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._awaiting: deque[tuple[int, asyncio.Future[Ack]]] = deque()
        self.configs: list[Config] = []
        self.errors: list[ErrorMessage] = []
        self._seq = 0

    async def connect(self, **options: Any) -> None:
        """Open the connection (options go to `websockets.connect`)."""
        self._connection = await connect(
            self.url,
            additional_headers=self._headers,
            compression=None,
            open_timeout=options.pop("open_timeout", 10),
            **options,
        )
        self._reader = asyncio.create_task(self._read())

    @property
    def connection(self) -> ClientConnection:
        """The open connection."""
        assert self._connection is not None, "connect() first"
        return self._connection

    @property
    def close_code(self) -> int | None:
        """The hub's close code once closed (1006 when the connection just broke)."""
        return self._connection.close_code if self._connection is not None else None

    def on_closed(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the connection is closed and every waiting ack has failed."""
        assert self._reader is not None, "connect() first"
        self._reader.add_done_callback(lambda _: callback())

    async def close(self) -> None:
        """Close the connection and stop reading."""
        if self._connection is not None:
            await self._connection.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def __aenter__(self) -> DeviceClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send_readings(
        self, readings: list[Reading] | list[dict[str, Any]], seq: int | None = None
    ) -> asyncio.Future[Ack]:
        """Send one `readings` message; the future completes with its ack."""
        if seq is None:
            self._seq += 1
            seq = self._seq
        message = {"type": "readings", "seq": seq, "readings": readings}
        return await self.send_raw(pack(message), seq)

    async def send_raw(self, frame: bytes | str, seq: int | None = None) -> asyncio.Future[Ack]:
        """Send any frame; with `seq`, also wait for the ack of that sequence number."""
        acked: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        if seq is not None:
            self._awaiting.append((seq, acked))
        else:
            acked.cancel()
        try:
            await self.connection.send(frame)
        except BaseException:
            # Never sent, so the caller never gets the future: its failure (the reader
            # fails every waiting ack once closed) must not be logged as never retrieved.
            if seq is not None:
                with contextlib.suppress(ValueError):  # the reader may have cleared it
                    self._awaiting.remove((seq, acked))
            if acked.done() and not acked.cancelled():
                acked.exception()
            acked.cancel()
            raise
        return acked

    async def store(self, readings: list[dict[str, Any]]) -> Ack:
        """Send readings and wait for their ack."""
        return await (await self.send_readings(readings))

    async def wait_closed(self) -> tuple[int | None, str | None]:
        """Wait until the hub closes the connection; return its close code and reason."""
        await self.connection.wait_closed()
        return self.connection.close_code, self.connection.close_reason

    async def _read(self) -> None:
        try:
            async for frame in self.connection:
                if isinstance(frame, str):
                    continue
                await self._dispatch(msgpack.unpackb(frame, raw=False))
        except ConnectionClosed:
            pass
        finally:
            for _, waiting in self._awaiting:
                if not waiting.done():
                    waiting.set_exception(ConnectionError("connection closed before the ack"))
            self._awaiting.clear()

    async def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "ack":
            ack = parse_ack(message)
            if not self._awaiting:
                return  # an ack for a message sent with `send_raw` without a seq
            seq, waiting = self._awaiting.popleft()
            if seq != ack.seq:
                waiting.set_exception(AssertionError(f"ack for {ack.seq}, expected {seq}"))
            elif not waiting.done():
                waiting.set_result(ack)
        elif kind == "config":
            config = Config.model_validate(message)
            self.configs.append(config)
            refusal = await self._on_config(config) if self._on_config else None
            answer = ConfigAck(
                type="config_ack", version=config.version, ok=refusal is None, error=refusal
            )
            await self.connection.send(pack(answer))
        elif kind == "error":
            self.errors.append(ErrorMessage.model_validate(message))
