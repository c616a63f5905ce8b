"""Closing connections whose token stopped working because it was rotated out.

A rotated-out token works until the end of its grace period; `rotate --grace 0` ends every
grace period of the device at once. The session checks its token when it starts (as it
checks revocation), and again after every operator change to its device; a connection
whose token has stopped working is closed with 4001, at once or when its grace ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from hub.ops.logs import device_extra
from hub.registry.ports import CredentialStore
from schemas.codes import CloseCode

log = logging.getLogger("hub.rotation")

ROTATED_OUT_REASON = "token rotated out"


@dataclass
class _Timer:
    expires_at: float
    task: asyncio.Task[None]


class RotationWatch:
    """One timer per connection using a token in its grace period."""

    def __init__(self, credentials: CredentialStore) -> None:
        self.credentials = credentials
        self._timers: dict[ServerConnection, _Timer] = {}

    def __len__(self) -> int:
        return len(self._timers)

    async def token_works(
        self, connection: ServerConnection, device_id: str, token_hash: str
    ) -> bool:
        """Re-read the connection's token: False if it no longer works; if it works only
        until its grace ends, close the connection then."""
        credential = await self.credentials.credential(token_hash)
        if credential is None:
            return False
        # The connection may have ended during the lookup (and been forgotten): no timer then.
        if credential.expires_at is not None and connection.state is not State.CLOSED:
            self._close_at(connection, device_id, credential.expires_at)
        return True

    async def recheck(self, connection: ServerConnection, device_id: str, token_hash: str) -> None:
        """After an operator change: close the connection now if its token stopped working."""
        if not await self.token_works(connection, device_id, token_hash):
            self._close_at(connection, device_id, time.time())

    def forget(self, connection: ServerConnection) -> None:
        """The connection ended: drop its timer."""
        timer = self._timers.pop(connection, None)
        if timer is not None:
            timer.task.cancel()

    def _close_at(self, connection: ServerConnection, device_id: str, expires_at: float) -> None:
        timer = self._timers.get(connection)
        if timer is not None:
            if timer.expires_at <= expires_at:
                return  # already closing no later than that
            timer.task.cancel()
        task = asyncio.create_task(self._close_when_due(connection, device_id, expires_at))
        self._timers[connection] = _Timer(expires_at, task)

    async def _close_when_due(
        self, connection: ServerConnection, device_id: str, expires_at: float
    ) -> None:
        await asyncio.sleep(max(0.0, expires_at - time.time()))
        self._timers.pop(connection, None)  # closing now: no longer to cancel
        log.warning(
            "device %s: its token was rotated out, closing the connection",
            device_id,
            extra=device_extra(device_id),
        )
        with contextlib.suppress(ConnectionClosed):
            await connection.close(CloseCode.REVOKED, ROTATED_OUT_REASON)
