"""`OperatorRegistry` on PostgreSQL: the `hub` commands' changes and reads, over asyncpg.

One connection per command. Bulk calls go `CHUNK` devices per statement (arrays bound as
parameters), all chunks in one transaction: `token add --count 100000` registers all of them
or none, and `config set --all` gives every device its new version in one commit. Each
statement is one of `queries`; a push, revocation or rotation rings the nodes holding the
changed devices itself (in SQL), at commit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Self

import asyncpg

from hub.core.protocol import DEFAULT_MAX_DEPTH
from hub.errors import DeviceExists, RegistryError, UnknownDevice
from hub.registry.postgres import operator_queries as oq
from hub.registry.postgres import queries as q
from hub.registry.postgres.connect import chunks, connect
from hub.registry.postgres.rows import config_state_of, device_of, node_of, presence_of
from hub.registry.records import (
    ConfigState,
    Device,
    Node,
    Presence,
    check_device_id,
    check_labels,
    config_text,
    hash_token,
)
from hub.registry.sqlite import new_token

CHUNK = 1000
"""Devices per statement of a bulk command."""


class PostgresOperator:
    """The operator's port on PostgreSQL (see `hub.registry.operator.OperatorRegistry`)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        """Use `open`."""
        self._conn = conn

    @classmethod
    async def open(cls, url: str) -> Self:
        """Connect to the registry at `url`, migrating its schema if needed;
        `RegistryUnavailable` if it cannot be used."""
        return cls(await connect(url))

    async def close(self) -> None:
        """See `OperatorRegistry.close`."""
        await self._conn.close()

    async def add_many(
        self, device_ids: list[str], labels: Mapping[str, str] | None = None
    ) -> list[str]:
        """See `OperatorRegistry.add_many`."""
        checked = check_labels(labels or {})
        seen: set[str] = set()
        for device_id in device_ids:
            if check_device_id(device_id) in seen:
                raise DeviceExists(device_id)
            seen.add(device_id)
        tokens = [new_token() for _ in device_ids]
        hashes = [hash_token(token) for token in tokens]
        try:
            async with self._conn.transaction():
                for ids, chunk_hashes in zip(
                    chunks(device_ids, CHUNK), chunks(hashes, CHUNK), strict=True
                ):
                    await self._conn.execute(oq.ADD_DEVICES, ids, chunk_hashes, checked)
        except asyncpg.UniqueViolationError:
            existing = await self._conn.fetch(q.DEVICES_BY_ID, device_ids)
            raise DeviceExists(existing[0]["device_id"] if existing else device_ids[0]) from None
        except asyncpg.DataError as exc:  # e.g. a NUL character, which text cannot hold
            raise RegistryError(f"labels cannot be stored: {exc}") from None
        return tokens

    async def revoke(self, device_id: str) -> None:
        """See `OperatorRegistry.revoke` (revoking a revoked device changes nothing)."""
        if await self._conn.fetchrow(oq.REVOKE_DEVICE, device_id) is None:
            await self._require(device_id)

    async def rotate(self, device_id: str, grace_s: float) -> str:
        """See `OperatorRegistry.rotate`."""
        if not grace_s >= 0:
            raise RegistryError("the grace period cannot be negative")
        token = new_token()
        row = await self._conn.fetchrow(oq.ROTATE_TOKEN, device_id, hash_token(token), grace_s)
        if row is None:
            await self._require(device_id)
            raise RegistryError(f"device {device_id!r} is revoked")
        return token

    async def devices(self) -> list[Device]:
        """See `OperatorRegistry.devices`."""
        return [device_of(row) for row in await self._conn.fetch(oq.DEVICES)]

    async def set_labels(
        self, device_id: str, labels: Mapping[str, str], remove: Iterable[str] = ()
    ) -> dict[str, str]:
        """See `OperatorRegistry.set_labels`."""
        checked = check_labels(labels)
        try:
            row = await self._conn.fetchrow(oq.SET_LABELS, device_id, checked, list(remove))
        except asyncpg.DataError as exc:
            raise RegistryError(f"labels cannot be stored: {exc}") from None
        if row is None:
            raise UnknownDevice(device_id)
        return dict(row["labels"])

    async def select(
        self,
        device_ids: Iterable[str] = (),
        *,
        everyone: bool = False,
        labels: Mapping[str, str] | None = None,
    ) -> list[str]:
        """See `OperatorRegistry.select`."""
        if everyone or labels:
            rows = await self._conn.fetch(oq.SELECT_BY_LABELS, dict(labels or {}))
            return [row["device_id"] for row in rows]
        chosen = list(dict.fromkeys(device_ids))
        found = {
            row["device_id"]: device_of(row)
            for row in await self._conn.fetch(q.DEVICES_BY_ID, chosen)
        }
        for device_id in chosen:
            device = found.get(device_id)
            if device is None:
                raise UnknownDevice(device_id)
            if not device.active:
                raise RegistryError(f"device {device_id!r} is revoked")
        return chosen

    async def set_config(
        self,
        device_ids: list[str],
        *,
        updates: Mapping[str, Any] | None = None,
        replace: Mapping[str, Any] | None = None,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> dict[str, int]:
        """See `OperatorRegistry.set_config`.

        The merged config of each device is checked before it is stored: with `replace`
        it is the same for all of them, checked once; otherwise each device's config is
        read, locked to the end of the transaction, merged and checked here, and then
        merged the same way in SQL (`||` on objects: the right side's keys win, as
        `dict.update`).
        """
        wanted = list(dict.fromkeys(device_ids))
        merge = dict(updates or {})
        whole = None if replace is None else dict(replace)
        if whole is not None and wanted:
            config_text(wanted[0], {**whole, **merge}, max_depth)
        versions: dict[str, int] = {}
        try:
            async with self._conn.transaction():
                if whole is None:
                    await self._conn.execute(oq.LOCK_CHANGE_SEQ)
                for chunk in chunks(wanted, CHUNK):
                    if whole is None:
                        await self._check_merged(chunk, merge, max_depth)
                    rows = await self._conn.fetch(oq.PUSH_CONFIG, chunk, merge, whole)
                    pushed = {row["device_id"]: int(row["config_version"]) for row in rows}
                    for device_id in chunk:
                        if device_id not in pushed:
                            raise UnknownDevice(device_id)
                    versions.update(pushed)
        except asyncpg.DataError as exc:  # e.g. a NUL character, which jsonb cannot hold
            raise RegistryError(f"the config cannot be stored: {exc}") from None
        except asyncpg.CheckViolationError:
            raise RegistryError("the config is larger than the registry stores") from None
        return {device_id: versions[device_id] for device_id in wanted}

    async def _check_merged(self, chunk: list[str], merge: dict[str, Any], max_depth: int) -> None:
        current = {
            row["device_id"]: row["config"]
            for row in await self._conn.fetch(oq.CONFIGS_FOR_UPDATE, chunk)
        }
        for device_id in chunk:
            if device_id not in current:
                raise UnknownDevice(device_id)
            config_text(device_id, {**current[device_id], **merge}, max_depth)

    async def config_state(self, device_id: str) -> ConfigState:
        """See `OperatorRegistry.config_state`."""
        states = await self.config_states([device_id])
        if not states:
            raise UnknownDevice(device_id)
        return states[0]

    async def config_states(self, device_ids: Sequence[str]) -> list[ConfigState]:
        """See `OperatorRegistry.config_states`."""
        rows = await self._conn.fetch(q.CONFIG_STATES, list(dict.fromkeys(device_ids)))
        return [config_state_of(row) for row in rows]

    async def presence(self) -> dict[str, Presence]:
        """See `OperatorRegistry.presence`."""
        return presence_of(await self._conn.fetch(q.DEVICE_PRESENCE))

    async def holders(self) -> dict[str, str]:
        """See `OperatorRegistry.holders`."""
        rows = await self._conn.fetch(q.DEVICE_HOLDERS)
        return {row["device_id"]: row["owner_node"] for row in rows}

    async def nodes(self) -> list[Node]:
        """See `OperatorRegistry.nodes`."""
        return [node_of(row) for row in await self._conn.fetch(q.NODES)]

    async def _require(self, device_id: str) -> None:
        if not await self._conn.fetch(q.DEVICES_BY_ID, [device_id]):
            raise UnknownDevice(device_id)
