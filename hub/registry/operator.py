"""The registry as the operator's commands see it: one async port, whatever the backend.

The `hub` commands (token, config, device, devices, top) are short-lived processes: each
opens an `OperatorRegistry` (hub.registry.backends.open_operator), runs a few calls under
`asyncio.run`, and closes it. SQLite implements it by calling its synchronous engine
(hub.registry.sqlite_operator), PostgreSQL with asyncpg (hub.registry.postgres.operator), so
each command is written once for both. Bulk calls (`add_many`, `set_config`) go a chunk of
devices per statement on PostgreSQL, all in one transaction as on SQLite.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from hub.core.protocol import DEFAULT_MAX_DEPTH
from hub.registry.records import ConfigState, Device, Node, Presence


class OperatorRegistry(Protocol):
    """What operators change and read; every change is seen by the hubs holding the devices."""

    async def add_many(
        self, device_ids: list[str], labels: Mapping[str, str] | None = None
    ) -> list[str]:
        """Register devices in one transaction; their new tokens in order (shown once only).
        `DeviceExists` (nothing registered) if one of them is."""
        ...

    async def revoke(self, device_id: str) -> None:
        """Stop accepting the device's token; the hub holding it closes it with 4001."""
        ...

    async def rotate(self, device_id: str, grace_s: float) -> str:
        """A new token for the device; the old one works for `grace_s` more seconds (0:
        every rotated-out token of the device ends now)."""
        ...

    async def devices(self) -> list[Device]:
        """Every registered device, by id."""
        ...

    async def set_labels(
        self, device_id: str, labels: Mapping[str, str], remove: Iterable[str] = ()
    ) -> dict[str, str]:
        """Set and remove labels of a device; its labels afterwards."""
        ...

    async def select(
        self,
        device_ids: Iterable[str] = (),
        *,
        everyone: bool = False,
        labels: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Active devices named (`UnknownDevice` or `RegistryError` for a revoked one), or
        all of them, or those carrying every one of `labels`."""
        ...

    async def set_config(
        self,
        device_ids: list[str],
        *,
        updates: Mapping[str, Any] | None = None,
        replace: Mapping[str, Any] | None = None,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> dict[str, int]:
        """New desired config versions: `updates` merged into each config, or `replace` it
        whole; each device's new version. `RegistryError` (nothing changed) for a config
        a device could not be sent (`records.config_text`)."""
        ...

    async def config_state(self, device_id: str) -> ConfigState:
        """The device's desired config, its version and last answer; `UnknownDevice`."""
        ...

    async def config_states(self, device_ids: Sequence[str]) -> list[ConfigState]:
        """`config_state` of several devices, by id (unknown ids are left out)."""
        ...

    async def presence(self) -> dict[str, Presence]:
        """Who is connected, as the hubs recorded it, per device."""
        ...

    async def holders(self) -> dict[str, str]:
        """The node id holding each online device's connection: a hub, or a worker of one
        (`NODE_ID/K`)."""
        ...

    async def nodes(self) -> list[Node]:
        """Every hub sharing the registry, live or not, by node id (none on SQLite)."""
        ...

    async def close(self) -> None:
        """Release the backend's connection."""
        ...
