"""The registry as the hub process sees it: narrow async ports, one per kind of user.

Each part of the hub is handed only the port it uses: the handshake and the rotation watch
a `CredentialStore`, a device session a `ConfigStore`, the presence tracker a
`PresenceStore`, the fleet watcher a `ChangeFeed`, the session table an `OwnershipStore`.
`HubRegistry` is all of them, what `hub.service` opens and closes. Every method is a
coroutine so that no backend blocks the event loop: the SQLite one (hub.registry.thread)
runs its queries on a thread of its own, the PostgreSQL one (hub.registry.postgres.backend)
awaits asyncpg.
tests/registry_contract.py is what each backend must pass.

Operator commands (add, revoke, rotate, set config, labels) are not here: the CLI is a
short-lived process with a port of its own (`hub.registry.operator.OperatorRegistry`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from hub.registry.records import (
    Claim,
    ConfigState,
    Credential,
    Device,
    DeviceChange,
    HeldSession,
    Presence,
    StaleSession,
)


class CredentialStore(Protocol):
    """Who a token belongs to, and whether a device may still connect."""

    async def credential(self, token_hash: str) -> Credential | None:
        """Whose token has this hash, if it works now: current, or rotated out and still in
        its grace period (then `expires_at` says until when); None for any other."""
        ...

    async def device(self, device_id: str) -> Device | None:
        """The device with that id, if registered (revoked ones too: see `active`)."""
        ...


class ConfigStore(Protocol):
    """Desired configs and the devices' answers to them."""

    async def config_state(self, device_id: str) -> ConfigState:
        """The device's desired config, its version and its last answer; `UnknownDevice`
        if there is no such device."""
        ...

    async def config_states(self, device_ids: Sequence[str]) -> list[ConfigState]:
        """`config_state` of many devices in one call (a push to the whole fleet asks for
        thousands at once): each known device once, in no set order; unknown ids are left
        out, not an error (a device deleted since the change was read)."""
        ...

    async def record_config_ack(
        self, device_id: str, version: int, ok: bool, error: str | None
    ) -> bool:
        """Store a device's answer to its latest version; False (nothing stored) for an
        answer to any other version, or one already answered."""
        ...


class PresenceStore(Protocol):
    """The hub's record of who is connected, which `hub devices` shows."""

    async def record_presence(self, states: Sequence[Presence]) -> None:
        """Store these devices' presence (replacing what was stored for them), all at once."""
        ...

    async def mark_all_offline(self) -> None:
        """Forget the connections of an earlier hub run, which may have died without saying."""
        ...

    async def presence(self) -> dict[str, Presence]:
        """What was last recorded, per device."""
        ...


class ChangeFeed(Protocol):
    """What operators changed (configs, revocations, rotations), for live sessions to act on.

    `wait_for_change` is the cheap signal (SQLite: polling `PRAGMA data_version`; PostgreSQL:
    LISTEN/NOTIFY); `changes_since` says which devices changed.
    """

    async def change_seq(self) -> int:
        """The sequence number of the latest operator change."""
        ...

    async def changes_since(self, seq: int) -> tuple[int, list[DeviceChange]]:
        """Devices changed after `seq`, and the sequence to ask from next time."""
        ...

    async def wait_for_change(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for another process to change the registry: True once it
        may have (then ask `changes_since`), False if nothing changed in that time. The
        hub's own writes (presence, config answers) do not count."""
        ...


class OwnershipStore(Protocol):
    """One live connection per device across every hub sharing the registry.

    A handshake `claim`s its device; the session's later writes name the claim's epoch
    (`record_claimed_config_ack`, and `Presence.epoch` for presence and the release at its
    end) and lose to a newer one. Both backends claim: PostgreSQL across hubs, SQLite across
    the processes of one host (the workers of `hub serve --workers N`).
    """

    async def claim(self, device_id: str, remote_address: str) -> Claim | None:
        """Make this hub the holder of the device's connection (from `remote_address`);
        the hub that held it hears `watch_takeovers`. None: the device cannot be claimed
        now (revoked, unknown, or this hub's lease has run out)."""
        ...

    async def record_claimed_config_ack(
        self, device_id: str, epoch: int, version: int, ok: bool, error: str | None
    ) -> bool:
        """`ConfigStore.record_config_ack` from the session of claim `epoch`: also False
        once another handshake claimed the device since."""
        ...

    async def release(self, device_id: str, epoch: int) -> None:
        """Give up the claim of `epoch` at once (its connection never became a session); a
        no-op once another handshake claimed the device. Sessions release with presence."""
        ...

    def watch_takeovers(
        self, listener: Callable[[str, int], None], missed: Callable[[], None]
    ) -> None:
        """Call `listener(device_id, epoch)` when another hub claims a device this one held,
        with the new epoch (sessions with an older one must close), and `missed()` when
        such news may have been lost (the notification listener reconnected)."""
        ...

    async def stale_sessions(self, sessions: Sequence[HeldSession]) -> list[StaleSession]:
        """The safety net: which of these sessions of this hub must close or be sent a
        config, and why (covers a takeover or a change whose notification was lost)."""
        ...


class HubRegistry(
    CredentialStore, ConfigStore, PresenceStore, ChangeFeed, OwnershipStore, Protocol
):
    """Every port, as one backend serves them; closed when the hub stops."""

    async def close(self) -> None:
        """Finish what was asked and release the backend's connection."""
        ...
