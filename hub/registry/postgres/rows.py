"""The registry's records (hub.registry.records) from PostgreSQL rows, for every reader."""

from __future__ import annotations

import asyncpg

from hub.registry.postgres.connect import seconds
from hub.registry.records import ConfigState, Device, Node, Presence


def device_of(row: asyncpg.Record) -> Device:
    """A `Device` from a `DEVICES` or `DEVICES_BY_ID` row."""
    created = seconds(row["created_at"])
    assert created is not None  # NOT NULL in the schema
    return Device(row["device_id"], created, seconds(row["revoked_at"]), dict(row["labels"]))


def config_state_of(row: asyncpg.Record) -> ConfigState:
    """A `ConfigState` from a `CONFIG_STATES` row."""
    return ConfigState(
        device_id=row["device_id"],
        config=dict(row["config"]),
        version=int(row["config_version"]),
        acked_version=row["acked_version"],
        ack_ok=row["ack_ok"],
        ack_error=row["ack_error"],
        acked_at=seconds(row["acked_at"]),
    )


def presence_of(rows: list[asyncpg.Record]) -> dict[str, Presence]:
    """`DEVICE_PRESENCE` rows as presence by device, leaving out devices no hub ever
    recorded (never connected, nothing stored), as the SQLite registry has no row for them."""
    return {
        row["device_id"]: Presence(
            row["device_id"],
            bool(row["online"]),
            row["remote_address"],
            seconds(row["connected_since"]),
            seconds(row["last_seen"]),
            int(row["readings_stored"]),
        )
        for row in rows
        if row["last_seen"] is not None or row["readings_stored"] > 0
    }


def node_of(row: asyncpg.Record) -> Node:
    """A `Node` from a `NODES` row."""
    return Node(
        row["node_id"],
        row["address"],
        row["started_at"].timestamp(),
        row["heartbeat_at"].timestamp(),
        row["lease_expires_at"].timestamp(),
        int(row["live_connections"]),
        bool(row["live"]),
    )
