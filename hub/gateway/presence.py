"""Who is connected: kept in memory, flushed to the registry, and charted in InfluxDB.

The registry copy is what `hub devices` shows; it is written in one transaction every
`presence_flush_s`, so a connect storm costs a handful of commits, not one per device. The
tracker is handed only the registry's `PresenceStore` port.
Connect and disconnect events also become points of the measurement
`hub_device_connection`, so uptime can be charted beside the readings; each is tagged with
the node id of the hub that wrote it (`hub`), so a device moving between hubs or workers
shows where it was.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from hub.core.lineprotocol import format_point
from hub.ops.logs import escape_control
from hub.registry.ports import PresenceStore
from hub.registry.records import Presence

log = logging.getLogger("hub.presence")

CONNECTION_MEASUREMENT = "hub_device_connection"
MAX_REASON_CHARS = 200


@dataclass(slots=True)
class _Live:
    remote_address: str
    connected_since: float
    last_seen: float
    readings_stored: int
    epoch: int = 0
    online: bool = True


class PresenceTracker:
    """Live connections per device, and the events to write about them."""

    def __init__(self, store: PresenceStore, node_id: str) -> None:
        """`node_id`: this hub's (operator-set text, escaped as any tag value)."""
        self.store = store
        self.node_id = node_id
        self._live: dict[str, _Live] = {}
        self._stored: dict[str, int] = {}
        # Changed since the last flush; turned into `Presence` rows only when flushed, since
        # every ack changes its device's entry.
        self._dirty: dict[str, _Live] = {}
        self._events: list[str] = []

    async def load(self, mark_all_offline: bool = True) -> None:
        """Before the first device connects: record everyone offline (a previous hub run may
        have died without saying; not by one worker of several, whose siblings hold devices)
        and continue each device's count of stored readings."""
        if mark_all_offline:
            await self.store.mark_all_offline()
        stored = await self.store.presence()
        self._stored = {p.device_id: p.readings_stored for p in stored.values()}

    def connected(self, device_id: str, remote_address: str, epoch: int = 0) -> None:
        """A device's connection opened, its session holding the claim of `epoch`."""
        now = time.time()
        live = _Live(remote_address, now, now, self._stored.get(device_id, 0), epoch)
        self._live[device_id] = live
        self._mark(device_id, live, online=True)
        self._event(device_id, now, event="connected", remote=remote_address, online=True)

    def stored(self, device_id: str, readings: int) -> None:
        """Readings of a device were acknowledged as stored."""
        live = self._live.get(device_id)
        if live is not None:
            live.last_seen = time.time()
            live.readings_stored += readings
            self._mark(device_id, live, online=True)

    def disconnected(self, device_id: str, reason: str) -> None:
        """A device's connection ended, for `reason` (which may hold the device's own close
        reason: escaped and cut here, since a line feed cannot be stored)."""
        reason = escape_control(reason)[:MAX_REASON_CHARS]
        live = self._live.pop(device_id, None)
        if live is None:
            return
        now = time.time()
        live.last_seen = now
        self._stored[device_id] = live.readings_stored
        self._mark(device_id, live, online=False)
        self._event(
            device_id,
            now,
            event="disconnected",
            remote=live.remote_address,
            online=False,
            reason=reason,
            connected_s=round(now - live.connected_since, 3),
        )

    def take_events(self) -> list[str]:
        """Line protocol of the connection events since the last call."""
        events, self._events = self._events, []
        return events

    async def flush(self) -> None:
        """Write changed presence to the registry."""
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, {}
        rows = [
            Presence(
                device_id,
                live.online,
                live.remote_address,
                live.connected_since,
                live.last_seen,
                live.readings_stored,
                live.epoch,
            )
            for device_id, live in dirty.items()
        ]
        try:
            await self.store.record_presence(rows)
        except BaseException:
            # Not stored (e.g. a CLI held the lock too long): the next flush writes them,
            # as they are by then.
            for device_id, live in dirty.items():
                self._dirty.setdefault(device_id, live)
            raise

    def _mark(self, device_id: str, live: _Live, *, online: bool) -> None:
        live.online = online
        self._dirty[device_id] = live

    def _event(self, device_id: str, now: float, **fields: str | bool | float) -> None:
        tags = {"device": device_id, "hub": self.node_id}
        line = format_point(CONNECTION_MEASUREMENT, tags, fields, int(now * 1e9))
        self._events.append(line)
