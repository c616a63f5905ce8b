"""Who holds each device's connection, presence and readings-stored counts, in SQLite.

The hub processes of one host (a hub, or the workers of `hub serve --workers N`, each its own
node id `NODE_ID/K`) share the registry file. The rules are PostgreSQL's
(hub.registry.postgres.queries):

* **Claims.** A handshake's `claim`, in one write transaction, makes its node the owner of
  the device's `presence` row and raises the row's epoch by one (it only grows: a release
  or a restart never lowers it). It returns the previous owner, whom the caller rings
  (hub.registry.host_doorbell). Every later write of that session names the epoch
  (`touch`, `release`, a config answer through `HELD_BY`) and matches nothing once another
  handshake claimed the device: a stale owner's late write loses.
* **Online** is "some node owns the row" (`owner_node IS NOT NULL`); the `online` column is
  kept equal to it for readers of older versions. A process that dies leaves its claims
  until its slot's next process opens the registry (`release_nodes` of its node id), or
  until the supervisor reaps it (hub.workers.supervisor), or the hub's next start.
* **Counts** are added as deltas (`add_stored`): each process reports what it stored since
  its last report, so counts from several processes add up and never go backwards.

Functions take the connection; the caller (hub.registry.thread, through `Registry.write`
and `Registry.read`) chooses the transaction. Pure SQL, no I/O of its own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence

from hub.registry.records import Claim, HeldSession, Presence, StaleReason, StaleSession

IDS_PER_STATEMENT = 500
"""Ids per `IN (...)`: well below SQLite's limit on bound parameters."""
MAX_ADDRESS_CHARS = 300
"""A remote address as stored (PostgreSQL's schema bound, kept the same here)."""

HELD_BY = (
    " AND EXISTS (SELECT 1 FROM presence AS p"
    " WHERE p.device_id = ? AND p.owner_node = ? AND p.epoch = ?)"
)
"""A condition to append to a statement on one device: (device id, node id, epoch) still
holds it. The config answer of a claimed session uses it (`Registry.record_config_ack`)."""


def claim(
    db: sqlite3.Connection, device_id: str, node_id: str, remote_address: str, now: float
) -> Claim | None:
    """Node `node_id` takes the device's connection from `remote_address`: its new epoch and
    the node it took it from (None: nobody held it). None if the device is unknown or
    revoked. Run in a write transaction: the read of the previous owner and the update are
    one step for every other process."""
    active = db.execute(
        "SELECT 1 FROM devices WHERE device_id = ? AND revoked_at IS NULL", (device_id,)
    ).fetchone()
    if active is None:
        return None
    previous = db.execute(
        "SELECT owner_node FROM presence WHERE device_id = ?", (device_id,)
    ).fetchone()
    (epoch,) = db.execute(
        "INSERT INTO presence (device_id, online, remote_address, connected_since, last_seen,"
        " owner_node, epoch) VALUES (?, 1, ?, ?, ?, ?, 1)"
        " ON CONFLICT (device_id) DO UPDATE SET online = 1, owner_node = excluded.owner_node,"
        " epoch = presence.epoch + 1, remote_address = excluded.remote_address,"
        " connected_since = excluded.connected_since, last_seen = excluded.last_seen"
        " RETURNING epoch",
        (device_id, remote_address[:MAX_ADDRESS_CHARS], now, now, node_id),
    ).fetchone()
    return Claim(int(epoch), None if previous is None else previous[0])


def release(db: sqlite3.Connection, device_id: str, node_id: str, epoch: int, now: float) -> bool:
    """Node `node_id`'s session of `epoch` ended; False (nothing changed) if it was taken
    over since."""
    cursor = db.execute(
        "UPDATE presence SET online = 0, owner_node = NULL, last_seen = ?"
        " WHERE device_id = ? AND owner_node = ? AND epoch = ?",
        (now, device_id, node_id, epoch),
    )
    return cursor.rowcount == 1


def release_nodes(db: sqlite3.Connection, node_ids: Sequence[str] | None) -> int:
    """Every claim of these nodes ends (None: of every node): their processes are gone.
    How many devices it released."""
    if node_ids is None:
        cursor = db.execute(
            "UPDATE presence SET online = 0, owner_node = NULL WHERE owner_node IS NOT NULL"
        )
        return cursor.rowcount
    released = 0
    for start in range(0, len(node_ids), IDS_PER_STATEMENT):
        chunk = node_ids[start : start + IDS_PER_STATEMENT]
        placeholders = ", ".join("?" * len(chunk))  # only `?`s: the ids are bound
        cursor = db.execute(
            "UPDATE presence SET online = 0, owner_node = NULL"  # noqa: S608
            f" WHERE owner_node IN ({placeholders})",
            chunk,
        )
        released += cursor.rowcount
    return released


def record_presence(
    db: sqlite3.Connection, node_id: str, states: Iterable[Presence], deltas: Mapping[str, int]
) -> None:
    """A presence flush of node `node_id`: sessions seen (by epoch), sessions ended (by
    epoch), rows of no claim (epoch 0) by device, and the readings stored since the last
    flush (`deltas`). Run in one write transaction."""
    for p in states:
        if p.epoch == 0:
            _record_unclaimed(db, node_id, p)
        elif p.online:
            db.execute(
                "UPDATE presence SET last_seen = ?"
                " WHERE device_id = ? AND owner_node = ? AND epoch = ?",
                (p.last_seen, p.device_id, node_id, p.epoch),
            )
        else:
            release(db, p.device_id, node_id, p.epoch, p.last_seen or 0.0)
    add_stored(db, deltas)


def _record_unclaimed(db: sqlite3.Connection, node_id: str, p: Presence) -> None:
    """A row of no claim (a device admitted from memory while the registry was away, or a
    test), recorded by device. Online makes `node_id` the owner; offline releases only what
    `node_id` owns, never another node's claim."""
    address = None if p.remote_address is None else p.remote_address[:MAX_ADDRESS_CHARS]
    db.execute(
        "INSERT INTO presence (device_id, online, remote_address, connected_since, last_seen,"
        " owner_node) SELECT ?, ?, ?, ?, ?, ?"
        " WHERE EXISTS (SELECT 1 FROM devices WHERE device_id = ?)"
        " ON CONFLICT (device_id) DO UPDATE SET online = excluded.online,"
        " owner_node = excluded.owner_node, remote_address = excluded.remote_address,"
        " connected_since = excluded.connected_since, last_seen = excluded.last_seen"
        " WHERE excluded.online OR presence.owner_node IS NULL OR presence.owner_node = ?",
        (
            p.device_id,
            p.online,
            address,
            p.connected_since,
            p.last_seen,
            node_id if p.online else None,
            p.device_id,
            node_id,
        ),
    )


def add_stored(db: sqlite3.Connection, deltas: Mapping[str, int]) -> None:
    """Add readings stored since the last report to each device's count; unknown devices and
    non-positive deltas are skipped. In device order: every process's flush takes the same
    path through the table."""
    db.executemany(
        "INSERT INTO presence (device_id, online, readings_stored) SELECT ?, 0, ?"
        " WHERE EXISTS (SELECT 1 FROM devices WHERE device_id = ?)"
        " ON CONFLICT (device_id) DO UPDATE"
        " SET readings_stored = presence.readings_stored + excluded.readings_stored",
        [(d, delta, d) for d, delta in sorted(deltas.items()) if delta > 0],
    )


def presence(db: sqlite3.Connection) -> dict[str, Presence]:
    """Every device's row: online while some node holds it, its counts summed over all."""
    rows = db.execute(
        "SELECT device_id, owner_node IS NOT NULL, remote_address, connected_since,"
        " last_seen, readings_stored FROM presence"
    ).fetchall()
    return {row[0]: Presence(row[0], bool(row[1]), *row[2:]) for row in rows}


def holders(db: sqlite3.Connection) -> dict[str, str]:
    """The node holding each device some node holds (`hub devices`' "hub")."""
    rows = db.execute(
        "SELECT device_id, owner_node FROM presence WHERE owner_node IS NOT NULL ORDER BY device_id"
    ).fetchall()
    return {str(row[0]): str(row[1]) for row in rows}


def taken_over(
    db: sqlite3.Connection, node_id: str, sessions: Sequence[HeldSession]
) -> list[StaleSession]:
    """The safety net's question on SQLite: which of node `node_id`'s sessions another
    handshake claimed since (their doorbell may have been lost). Revocations, rotations and
    pushes are not asked here: every process's fleet watcher reads every change of the file
    (`PRAGMA data_version`), which no lost message can hide."""
    found: list[StaleSession] = []
    for start in range(0, len(sessions), IDS_PER_STATEMENT):
        chunk = sessions[start : start + IDS_PER_STATEMENT]
        placeholders = ", ".join("?" * len(chunk))  # only `?`s: the ids are bound
        rows = db.execute(
            "SELECT device_id, owner_node, epoch FROM presence"  # noqa: S608
            f" WHERE device_id IN ({placeholders})",
            [s.device_id for s in chunk],
        ).fetchall()
        held = {row[0]: (row[1], row[2]) for row in rows}
        found.extend(
            StaleSession(s.device_id, s.epoch, StaleReason.TAKEN_OVER, s.config_version)
            for s in chunk
            if held.get(s.device_id) != (node_id, s.epoch)
        )
    return found
