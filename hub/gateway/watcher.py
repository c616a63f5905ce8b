"""The fleet watcher: what operators change from the CLI, acted on in live sessions.

A new desired config is pushed, a revoked device closed with 4001, and after any change of
a device its session's token is read again (a rotation without grace closes it with 4001).
It waits on the registry's change feed, whose signal is cheap (SQLite: one `PRAGMA
data_version` per poll, on the registry's thread), and only then reads which devices
changed. The configs to push for one batch of changes are read in one `config_states`
call: a change to 10,000 devices asked for each device's on its own cost 10,000 round trips
to the registry's thread (~75 us each, `benchmarks/bench_registry.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from hub.errors import RegistryUnavailable
from hub.gateway.rotation import RotationWatch
from hub.gateway.session import DeviceSession
from hub.ops.logs import device_extra
from hub.registry.ports import ChangeFeed, ConfigStore
from hub.registry.records import DeviceChange

OUTAGE_RETRY_S = 0.2
"""How soon the watcher asks again after the registry failed (it may be polled every 10 ms;
an outage must not become a busy loop). Within the 2 s in which pushes catch up."""

log = logging.getLogger("hub.server")

WATCH_WAIT_S = 1.0
"""How long one wait for an operator change lasts before the watcher waits again."""


class FleetWatcher:
    """Acts on operator changes for the sessions in `sessions` (the hub's live table)."""

    def __init__(
        self,
        feed: ChangeFeed,
        configs: ConfigStore,
        sessions: Mapping[str, DeviceSession],
        rotation: RotationWatch,
        retry_s: float,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        """`retry_s`: the pause after the registry could not be read; `spawn` runs session
        work in the background (a slow device must not hold up the others' changes)."""
        self.feed = feed
        self.configs = configs
        self.sessions = sessions
        self.rotation = rotation
        self.retry_s = retry_s
        self.spawn = spawn
        self._owed_pushes: set[DeviceSession] = set()
        """Sessions whose changed config could not be read (registry unavailable): retried
        every OUTAGE_RETRY_S until it can, so no push is lost to an outage."""
        self._owed_rechecks: set[DeviceSession] = set()

    async def run(self) -> None:
        """Watch until cancelled."""
        seen_change = await self.feed.change_seq()
        missed = False  # a signal was taken but its changes could not be read: read again
        while True:
            await self._retry_owed()
            owed = bool(self._owed_pushes or self._owed_rechecks)
            try:
                wait_s = OUTAGE_RETRY_S if owed else WATCH_WAIT_S
                if not missed and not await self.feed.wait_for_change(wait_s):
                    continue
                missed = True
                seen_change, changes = await self.feed.changes_since(seen_change)
                missed = False
            except RegistryUnavailable:  # said once by the registry's health: try again shortly
                await asyncio.sleep(max(self.retry_s, OUTAGE_RETRY_S))
                continue
            except Exception:  # a bug, not an outage: say so, and go on watching
                log.exception("reading operator changes from the registry failed")
                await asyncio.sleep(max(self.retry_s, OUTAGE_RETRY_S))
                continue
            changed: list[tuple[DeviceSession, DeviceChange]] = []
            for change in changes:
                session = self.sessions.get(change.device_id)
                if session is None:
                    continue
                if change.revoked:
                    self.spawn(session.revoke())
                    continue
                changed.append((session, change))
            to_push = [s for s, change in changed if change.config_version > s.config_sent]
            if to_push:  # first: its one lookup goes ahead of the token lookups on the thread
                self.spawn(self._push_configs(to_push))
            for session, change in changed:
                # Not awaited one by one: a change of 10,000 devices queues its lookups at
                # once on the registry's thread. A config push alone (PostgreSQL knows) needs
                # none: 10,000 token lookups off a fleet-wide push.
                if change.token_changed:
                    self.spawn(self._recheck_token(session))

    async def _push_configs(self, sessions: list[DeviceSession]) -> None:
        """Read the configs of `sessions` in one call, then push each in a task of its own
        (a device slow to take its config must not hold up the others')."""
        try:
            states = await self.configs.config_states([s.device_id for s in sessions])
        except Exception as exc:  # the registry unreadable for now: retried, see _owed_pushes
            if not isinstance(exc, RegistryUnavailable):
                log.exception("reading the configs of %d changed devices failed", len(sessions))
            self._owed_pushes.update(sessions)
            return
        by_device = {state.device_id: state for state in states}
        pushing = [s for s in sessions if s.device_id in by_device]  # else deleted since
        if len(pushing) == 1:
            log.info(
                "device %s: pushing config version %d",
                pushing[0].device_id,
                by_device[pushing[0].device_id].version,
                extra=device_extra(pushing[0].device_id),
            )
        elif pushing:
            log.info("pushing a new config to %d devices connected here", len(pushing))
        for session in pushing:
            self.spawn(session.push_config(by_device[session.device_id]))

    async def _recheck_token(self, session: DeviceSession) -> None:
        try:
            await self.rotation.recheck(session.connection, session.device_id, session.token_hash)
        except Exception as exc:  # the registry unreadable for now: retried
            if not isinstance(exc, RegistryUnavailable):
                log.exception(
                    "device %s: re-reading its token failed",
                    session.device_id,
                    extra=device_extra(session.device_id),
                )
            self._owed_rechecks.add(session)

    async def _retry_owed(self) -> None:
        """Once more, the pushes and token checks an outage held up (of sessions still
        live; a reconnected device gets its config at its handshake anyway)."""
        pushes, self._owed_pushes = self._owed_pushes, set()
        rechecks, self._owed_rechecks = self._owed_rechecks, set()
        live = [s for s in pushes if self.sessions.get(s.device_id) is s]
        if live:
            await self._push_configs(live)
        for session in rechecks:
            if self.sessions.get(session.device_id) is session:
                self.spawn(self._recheck_token(session))
