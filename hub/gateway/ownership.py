"""One live connection per device, on this hub and across every hub sharing the registry.

A session begins with a claim of its device (`OwnershipStore.claim`), which gives it an
epoch that only grows per device. The hub's `SessionTable` holds the newest session of each
device: a second connection to this hub replaces the first (closed with 4000, as the
protocol says), and so does a claim on another hub, heard at once on the registry's
doorbell (`watch_takeovers`, with the new epoch: a session claimed here since stays). The
session's late writes name its epoch (`ClaimedConfigs` for its config answers,
`Presence.epoch` for presence and its release) and lose to a newer claim.

A notification can be lost (the doorbell's connection dropped), so every `SAFETY_NET_S`,
and at once when the doorbell listens again after losing its connection, the hub also asks
the registry about all its claimed sessions (`stale_sessions`): one taken over is closed
with 4000, one revoked or on a token rotated out past its grace with 4001, and one behind
on its config is sent the newest. That bounds how long a lost notification leaves two
sessions of one device, or a revoked device connected, at `SAFETY_NET_S` plus one check.
On SQLite the same holds across the workers of one host (hub.registry.thread), where the
net asks only about takeovers (the fleet watcher sees every other change of the file).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol

from websockets.asyncio.server import ServerConnection

from hub.core.handshake import HandshakeRefused
from hub.gateway.rotation import ROTATED_OUT_REASON
from hub.gateway.session import DeviceSession
from hub.ops.logs import device_extra
from hub.registry.ports import ConfigStore, OwnershipStore
from hub.registry.records import Claim, ConfigState, HeldSession, StaleReason
from schemas.codes import CloseCode

log = logging.getLogger("hub.server")

SAFETY_NET_S = 5.0
"""How often the hub checks all its claimed sessions against the registry."""
REPLACED_REASON = "replaced by a newer connection"
CLAIM_RETRY_AFTER_S = 5
"""`Retry-After` of a handshake whose device could not be claimed."""


class ClaimStore(ConfigStore, OwnershipStore, Protocol):
    """The registry as the ownership side uses it: configs and claims."""


class DisconnectSink(Protocol):
    """Who is told that a device's session ended (the presence tracker)."""

    def disconnected(self, device_id: str, reason: str) -> None:
        """The device's live session ended, for `reason`."""
        ...


class ClaimedConfigs:
    """The `ConfigStore` of one session: its answers name its claim's epoch, and it keeps
    the newest config version the session has seen (sent, or found answered already)."""

    __slots__ = ("_store", "epoch", "known_version")

    def __init__(self, store: ClaimStore, epoch: int) -> None:
        self._store = store
        self.epoch = epoch
        self.known_version = 0

    async def config_state(self, device_id: str) -> ConfigState:
        """See `ConfigStore.config_state`; what it returns the session has seen."""
        state = await self._store.config_state(device_id)
        self.known_version = max(self.known_version, state.version)
        return state

    async def config_states(self, device_ids: Sequence[str]) -> list[ConfigState]:
        """See `ConfigStore.config_states` (the session asks for its own device only)."""
        states = await self._store.config_states(device_ids)
        for state in states:
            self.known_version = max(self.known_version, state.version)
        return states

    async def record_config_ack(
        self, device_id: str, version: int, ok: bool, error: str | None
    ) -> bool:
        """See `ConfigStore.record_config_ack`; False once another claim took the device."""
        return await self._store.record_claimed_config_ack(
            device_id, self.epoch, version, ok, error
        )


@dataclass(frozen=True, slots=True)
class _Held:
    session: DeviceSession
    configs: ClaimedConfigs


class SessionTable(Mapping[str, DeviceSession]):
    """The live session of each device on this hub, the one with the newest claim."""

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}

    def __getitem__(self, device_id: str) -> DeviceSession:
        return self._held[device_id].session

    def __iter__(self) -> Iterator[str]:
        return iter(self._held)

    def __len__(self) -> int:
        return len(self._held)

    def take(self, session: DeviceSession, configs: ClaimedConfigs) -> DeviceSession | None:
        """Hold `session` as its device's live one. Returns the session to close with
        4000: the one it replaced, or `session` itself when one of a newer claim is held
        already (claims and upgrades can finish in different orders); None for neither."""
        held = self._held.get(session.device_id)
        if held is not None and held.configs.epoch > configs.epoch:
            return session
        self._held[session.device_id] = _Held(session, configs)
        return None if held is None else held.session

    def drop(self, session: DeviceSession) -> bool:
        """The session ended: forget it if it is still its device's live one (True)."""
        held = self._held.get(session.device_id)
        if held is None or held.session is not session:
            return False
        del self._held[session.device_id]
        return True

    def taken_over(self, device_id: str, epoch: int) -> DeviceSession | None:
        """Another claim of `epoch` took the device: forget and return the session of an
        older claim, if one is held (None if the one held is as new or newer)."""
        held = self._held.get(device_id)
        if held is None or held.configs.epoch >= epoch:
            return None
        del self._held[device_id]
        return held.session

    def claimed(self) -> list[HeldSession]:
        """Every held session with a claim (epoch above 0), as the safety net checks it."""
        return [
            HeldSession(
                device_id,
                held.configs.epoch,
                max(held.configs.known_version, held.session.config_sent),
                held.session.token_hash,
            )
            for device_id, held in self._held.items()
            if held.configs.epoch
        ]

    def session_of(self, device_id: str, epoch: int) -> DeviceSession | None:
        """The held session of the device if its claim is `epoch`."""
        held = self._held.get(device_id)
        return held.session if held is not None and held.configs.epoch == epoch else None


class Ownership:
    """Claims, the session table, takeovers heard from other hubs, and the safety net."""

    def __init__(
        self,
        store: ClaimStore,
        presence: DisconnectSink,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        safety_net_s: float = SAFETY_NET_S,
        lost: Callable[[], None] = lambda: None,
    ) -> None:
        """`spawn` runs a close or a push in the background (a slow peer holds up nothing);
        `lost` is told of each session closed because another node claimed its device."""
        self.sessions = SessionTable()
        self._store = store
        self._presence = presence
        self._spawn = spawn
        self._safety_net_s = safety_net_s
        self._lost = lost
        self._unstarted: dict[ServerConnection, tuple[str, int]] = {}
        self._overtaken: dict[str, int] = {}
        """Devices of unstarted connections here that another node claimed since, with the
        newest epoch heard: a ring can beat its session into the table (see `taken_over`)."""
        self._check_now = asyncio.Event()
        store.watch_takeovers(self.taken_over, self._check_now.set)

    async def claim(self, connection: ServerConnection, device_id: str, remote: str) -> Claim:
        """Claim the device's connection for a handshake, before its upgrade: once the
        device's connect returns, every later handshake of it is the newer one. Refused
        (503, `Retry-After`) when the device cannot be claimed now. Released at once if the
        connection is lost before its session starts (`started`)."""
        claim = await self._store.claim(device_id, remote)
        if claim is None:  # revoked since the lookup, or this hub's lease has run out
            raise HandshakeRefused(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "the hub cannot take this device's connection now",
                retry_after=CLAIM_RETRY_AFTER_S,
            )
        if claim.epoch:
            self._unstarted[connection] = (device_id, claim.epoch)
            connection.connection_lost_waiter.add_done_callback(
                lambda _: self._lost_before_start(connection)
            )
        return claim

    def started(self, connection: ServerConnection) -> None:
        """The connection's session starts: from now on its end releases its claim."""
        self._unstarted.pop(connection, None)

    def configs(self, epoch: int) -> ClaimedConfigs:
        """The config store of the session of claim `epoch`."""
        return ClaimedConfigs(self._store, epoch)

    def hold(self, session: DeviceSession, configs: ClaimedConfigs) -> bool:
        """Make `session` its device's live one, closing the one it replaces with 4000.
        False: a session of a newer claim holds the device; `session` is closed instead."""
        overtaken = self._overtaken.pop(session.device_id, 0)
        if configs.epoch and overtaken > configs.epoch:  # claimed elsewhere before it started
            self._lost()
            self._spawn(session.connection.close(CloseCode.REPLACED, REPLACED_REASON))
            return False
        replaced = self.sessions.take(session, configs)
        if replaced is session:
            self._spawn(session.connection.close(CloseCode.REPLACED, REPLACED_REASON))
            return False
        if replaced is not None:
            self._close_replaced(replaced, f"{CloseCode.REPLACED} replaced")
        return True

    def release(self, session: DeviceSession) -> bool:
        """The session ended; True if it was its device's live one (nothing replaced it)."""
        return self.sessions.drop(session)

    def taken_over(self, device_id: str, epoch: int) -> None:
        """Another hub claimed the device with `epoch`: close an older session of it."""
        session = self.sessions.taken_over(device_id, epoch)
        if session is None:
            # Two connections of one device milliseconds apart: the ring can arrive while
            # the older one's upgrade is still being answered, before its session is in the
            # table; remembered, that session is closed as it starts, not 5 s later.
            if any(d == device_id and e < epoch for d, e in self._unstarted.values()):
                self._overtaken[device_id] = max(epoch, self._overtaken.get(device_id, 0))
        else:
            self._lost()
            log.info(
                "device %s: taken over by a connection to another hub",
                device_id,
                extra=device_extra(device_id),
            )
            self._close_replaced(session, f"{CloseCode.REPLACED} taken over by another hub")

    async def run(self) -> None:
        """The safety net, every `safety_net_s` and whenever takeovers may have gone
        unheard, until cancelled."""
        failing = False
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._safety_net_s):
                    await self._check_now.wait()
            self._check_now.clear()
            held = self.sessions.claimed()
            if not held:
                continue
            try:
                stale = await self._store.stale_sessions(held)
            except Exception as exc:  # the registry unreachable: the next round checks again
                if not failing:  # once per outage
                    log.warning("checking sessions against the registry failed: %r", exc)
                failing = True
                continue
            failing = False
            for found in stale:
                session = self.sessions.session_of(found.device_id, found.epoch)
                if session is None:  # ended, or replaced, during the check
                    continue
                if found.reason is StaleReason.TAKEN_OVER:  # by some newer epoch
                    self.taken_over(found.device_id, found.epoch + 1)
                elif found.reason is StaleReason.REVOKED:
                    self._spawn(session.revoke())
                elif found.reason is StaleReason.TOKEN_RETIRED:
                    self._spawn(session.revoke(ROTATED_OUT_REASON))
                else:
                    self._spawn(session.push_config())

    def _lost_before_start(self, connection: ServerConnection) -> None:
        unstarted = self._unstarted.pop(connection, None)
        if unstarted is not None:
            self._overtaken.pop(unstarted[0], None)
            self._spawn(self._release(*unstarted))

    async def _release(self, device_id: str, epoch: int) -> None:
        try:
            await self._store.release(device_id, epoch)
        except Exception as exc:  # left held: the device's next handshake claims it again
            log.warning(
                "device %s: releasing its claim failed: %r",
                device_id,
                exc,
                extra=device_extra(device_id),
            )

    def _close_replaced(self, session: DeviceSession, reason: str) -> None:
        # Not awaited: a vanished old peer must not delay the new session.
        self._spawn(session.connection.close(CloseCode.REPLACED, REPLACED_REASON))
        self._presence.disconnected(session.device_id, reason)
