"""Who holds each device's connection, presence and readings-stored counts, in SQLite.

The hub processes of one host (a hub, or the workers of `hub serve --workers N`, each its own
node id `NODE_ID/K`) share the registry. Claims live in `connections.sqlite3`, which only
hub processes write, so an operator's long transaction on `registry.sqlite3` never holds up
a handshake (hub.registry.sqlite_files). The rules are PostgreSQL's
(hub.registry.postgres.queries):

* **Claims.** A handshake's `claim`, in one write transaction of the connections file,
  makes its node the owner of the device's row and raises the row's epoch by one (it only
  grows: a release or a restart never lowers it). It returns the previous owner, whom the
  caller rings (hub.registry.host_doorbell). Every later write of that session names the
  epoch (a flush's `record_sessions`, `release`, a config answer after `holds`) and matches
  nothing once another handshake claimed the device: a stale owner's late write loses. The
  caller checks the device is active first (the devices are in the other file): a
  revocation committing in between is caught by the session's own check at its start and
  by the fleet watcher.
* **Online** is "some node owns the row" (`owner_node IS NOT NULL`). A process that dies
  leaves its claims until its slot's next process opens the registry (`release_nodes` of
  its node id), or the supervisor reaps it (hub.workers.claims), or the hub starts again.
* **Counts** stay in `registry.sqlite3`'s `presence` table, added as deltas (`add_stored`):
  each process reports what it stored since its last report, so counts from several
  processes add up and never go backwards.

Functions take the connection (of the file named); the caller (hub.registry.thread, through
`Registry.write_connections`, `read_connections` and `write`) chooses the transaction. Pure
SQL, no I/O of its own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence

from hub.registry.records import Claim, HeldSession, Presence, StaleReason, StaleSession

CONNECTIONS_FILE = "connections.sqlite3"
IDS_PER_STATEMENT = 500
"""Ids per `IN (...)`: well below SQLite's limit on bound parameters."""
MAX_ADDRESS_CHARS = 300
"""A remote address as stored (PostgreSQL's schema bound, kept the same here)."""


def claim(
    db: sqlite3.Connection, device_id: str, node_id: str, remote_address: str, now: float
) -> Claim:
    """Node `node_id` takes the device's connection from `remote_address`: its new epoch and
    the node it took it from (None: nobody held it, or `node_id` itself). Run in a write
    transaction: the read of the previous owner and the update are one step for every other
    process."""
    previous = db.execute(
        "SELECT owner_node FROM connections WHERE device_id = ?", (device_id,)
    ).fetchone()
    (epoch,) = db.execute(
        "INSERT INTO connections (device_id, owner_node, epoch, remote_address,"
        " connected_since, last_seen) VALUES (?, ?, 1, ?, ?, ?)"
        " ON CONFLICT (device_id) DO UPDATE SET owner_node = excluded.owner_node,"
        " epoch = connections.epoch + 1, remote_address = excluded.remote_address,"
        " connected_since = excluded.connected_since, last_seen = excluded.last_seen"
        " RETURNING epoch",
        (device_id, node_id, remote_address[:MAX_ADDRESS_CHARS], now, now),
    ).fetchone()
    taken_from = None if previous is None or previous[0] == node_id else previous[0]
    return Claim(int(epoch), taken_from)


def holds(db: sqlite3.Connection, device_id: str, node_id: str, epoch: int) -> bool:
    """Whether node `node_id`'s claim of `epoch` still holds the device."""
    row = db.execute(
        "SELECT 1 FROM connections WHERE device_id = ? AND owner_node = ? AND epoch = ?",
        (device_id, node_id, epoch),
    ).fetchone()
    return row is not None


def release(db: sqlite3.Connection, device_id: str, node_id: str, epoch: int, now: float) -> bool:
    """Node `node_id`'s session of `epoch` ended; False (nothing changed) if it was taken
    over since."""
    cursor = db.execute(
        "UPDATE connections SET owner_node = NULL, last_seen = ?"
        " WHERE device_id = ? AND owner_node = ? AND epoch = ?",
        (now, device_id, node_id, epoch),
    )
    return cursor.rowcount == 1


def release_nodes(db: sqlite3.Connection, node_ids: Sequence[str] | None) -> int:
    """Every claim of these nodes ends (None: of every node): their processes are gone.
    How many devices it released."""
    if node_ids is None:
        cursor = db.execute("UPDATE connections SET owner_node = NULL WHERE owner_node IS NOT NULL")
        return cursor.rowcount
    released = 0
    for start in range(0, len(node_ids), IDS_PER_STATEMENT):
        chunk = node_ids[start : start + IDS_PER_STATEMENT]
        placeholders = ", ".join("?" * len(chunk))  # only `?`s: the ids are bound
        cursor = db.execute(
            "UPDATE connections SET owner_node = NULL"  # noqa: S608
            f" WHERE owner_node IN ({placeholders})",
            chunk,
        )
        released += cursor.rowcount
    return released


def record_sessions(db: sqlite3.Connection, node_id: str, states: Iterable[Presence]) -> None:
    """The connections part of node `node_id`'s presence flush: sessions seen and ended (by
    epoch), and rows of no claim (epoch 0) by device, registered devices only (the caller
    leaves others out). Run in one write transaction of the connections file."""
    for p in states:
        if p.epoch == 0:
            _record_unclaimed(db, node_id, p)
        elif p.online:
            db.execute(
                "UPDATE connections SET last_seen = ?"
                " WHERE device_id = ? AND owner_node = ? AND epoch = ?",
                (p.last_seen, p.device_id, node_id, p.epoch),
            )
        else:
            release(db, p.device_id, node_id, p.epoch, p.last_seen or 0.0)


def _record_unclaimed(db: sqlite3.Connection, node_id: str, p: Presence) -> None:
    """A row of no claim (a device admitted from memory while the registry was away, or a
    test), recorded by device. Online makes `node_id` the owner; offline releases only what
    `node_id` owns, never another node's claim."""
    address = None if p.remote_address is None else p.remote_address[:MAX_ADDRESS_CHARS]
    db.execute(
        "INSERT INTO connections (device_id, owner_node, remote_address, connected_since,"
        " last_seen) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (device_id) DO UPDATE SET owner_node = excluded.owner_node,"
        " remote_address = excluded.remote_address,"
        " connected_since = excluded.connected_since, last_seen = excluded.last_seen"
        " WHERE excluded.owner_node IS NOT NULL OR connections.owner_node IS NULL"
        " OR connections.owner_node = ?",
        (
            p.device_id,
            node_id if p.online else None,
            address,
            p.connected_since,
            p.last_seen,
            node_id,
        ),
    )


def add_stored(db: sqlite3.Connection, deltas: Mapping[str, int]) -> None:
    """Add readings stored since the last report to each device's count (the registry
    file's `presence` table); unknown devices and non-positive deltas are skipped. In device
    order: every process's flush takes the same path through the table."""
    db.executemany(
        "INSERT INTO presence (device_id, online, readings_stored) SELECT ?, 0, ?"
        " WHERE EXISTS (SELECT 1 FROM devices WHERE device_id = ?)"
        " ON CONFLICT (device_id) DO UPDATE"
        " SET readings_stored = presence.readings_stored + excluded.readings_stored",
        [(d, delta, d) for d, delta in sorted(deltas.items()) if delta > 0],
    )


def presence(registry: sqlite3.Connection, connections: sqlite3.Connection) -> dict[str, Presence]:
    """Every device's presence: online while some node holds it, where from and when
    (the connections file), its count summed over every process (the registry file)."""
    counted = registry.execute(
        "SELECT device_id, remote_address, connected_since, last_seen, readings_stored"
        " FROM presence"
    ).fetchall()
    found = {row[0]: Presence(row[0], False, *row[1:]) for row in counted}
    for device_id, owner, remote_address, connected_since, last_seen in connections.execute(
        "SELECT device_id, owner_node, remote_address, connected_since, last_seen FROM connections"
    ):
        stored = found[device_id].readings_stored if device_id in found else 0
        found[device_id] = Presence(
            device_id, owner is not None, remote_address, connected_since, last_seen, stored
        )
    return found


def holders(db: sqlite3.Connection) -> dict[str, str]:
    """The node holding each device some node holds (`hub devices`' "hub")."""
    rows = db.execute(
        "SELECT device_id, owner_node FROM connections WHERE owner_node IS NOT NULL"
        " ORDER BY device_id"
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
            "SELECT device_id, owner_node, epoch FROM connections"  # noqa: S608
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
