"""`OperatorRegistry` on the SQLite file: the synchronous engine, called from coroutines.

The operator's commands are short-lived processes with nothing else to run meanwhile, so
the engine's calls block the event loop on purpose: no thread to hand them to. The SQL stays
in `hub.registry.sqlite.Registry`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hub.core.protocol import DEFAULT_MAX_DEPTH
from hub.registry import sqlite_claims
from hub.registry.records import ConfigState, Device, Node, Presence
from hub.registry.sqlite import Registry


class SQLiteOperator:
    """The operator's port on `Registry` (see `hub.registry.operator.OperatorRegistry`)."""

    def __init__(self, engine: Registry) -> None:
        """Use `engine`, closed by `close`."""
        self.engine = engine

    @classmethod
    def open(cls, path: Path) -> SQLiteOperator:
        """Open (creating and upgrading if needed) the registry file at `path`."""
        return cls(Registry(path))

    async def add_many(
        self, device_ids: list[str], labels: Mapping[str, str] | None = None
    ) -> list[str]:
        """See `OperatorRegistry.add_many`."""
        return self.engine.add_many(device_ids, labels)

    async def revoke(self, device_id: str) -> None:
        """See `OperatorRegistry.revoke`."""
        self.engine.revoke(device_id)

    async def rotate(self, device_id: str, grace_s: float) -> str:
        """See `OperatorRegistry.rotate`."""
        return self.engine.rotate(device_id, grace_s)

    async def devices(self) -> list[Device]:
        """See `OperatorRegistry.devices`."""
        return self.engine.devices()

    async def set_labels(
        self, device_id: str, labels: Mapping[str, str], remove: Iterable[str] = ()
    ) -> dict[str, str]:
        """See `OperatorRegistry.set_labels`."""
        return self.engine.set_labels(device_id, labels, remove)

    async def select(
        self,
        device_ids: Iterable[str] = (),
        *,
        everyone: bool = False,
        labels: Mapping[str, str] | None = None,
    ) -> list[str]:
        """See `OperatorRegistry.select`."""
        return self.engine.select(device_ids, everyone=everyone, labels=labels)

    async def set_config(
        self,
        device_ids: list[str],
        *,
        updates: Mapping[str, Any] | None = None,
        replace: Mapping[str, Any] | None = None,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> dict[str, int]:
        """See `OperatorRegistry.set_config`."""
        return self.engine.set_config(
            device_ids, updates=updates, replace=replace, max_depth=max_depth
        )

    async def config_state(self, device_id: str) -> ConfigState:
        """See `OperatorRegistry.config_state`."""
        return self.engine.config_state(device_id)

    async def config_states(self, device_ids: Sequence[str]) -> list[ConfigState]:
        """See `OperatorRegistry.config_states`."""
        return self.engine.config_states(device_ids)

    async def presence(self) -> dict[str, Presence]:
        """See `OperatorRegistry.presence`."""
        return self.engine.presence()

    async def holders(self) -> dict[str, str]:
        """See `OperatorRegistry.holders`: the hub process (or worker) holding each."""
        return self.engine.read_connections(sqlite_claims.holders)

    async def nodes(self) -> list[Node]:
        """See `OperatorRegistry.nodes`: a SQLite registry has no nodes."""
        return []

    async def close(self) -> None:
        """See `OperatorRegistry.close`."""
        self.engine.close()
