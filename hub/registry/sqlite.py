"""The device registry: devices, tokens, labels, desired configs and presence, in SQLite.

The hub and the operator's CLI share this one file on one host. Operator changes (a new
config, a revocation) bump a change sequence; the hub notices a commit from another process
through `PRAGMA data_version` and reads only the devices changed since it last looked.

Tokens are 256 random bits, shown once when issued and stored only as their SHA-256. A slow
password hash buys nothing for secrets this long; a fast one keeps a connect storm cheap.
The lookup goes by hash, so how long it takes says nothing about any stored token, and the
found hash is compared again with `hmac.compare_digest`.

Rotating a token (`rotate`) keeps the old hash in `retired_tokens` until the grace period
the operator chose is over; after that the old token fails like an unknown one.

Who holds each device's connection (the claims of the hub processes of this host) is in a
second file beside it, `connections.sqlite3`, that only hubs write (hub.registry.sqlite_files
says why); its SQL, presence and the readings-stored counts are in `hub.registry.sqlite_claims`,
run through `write_connections`, `read_connections` and `write`.
"""

from __future__ import annotations

import hmac
import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

from hub.core.protocol import DEFAULT_MAX_DEPTH
from hub.errors import DeviceExists, RegistryError, UnknownDevice
from hub.registry import sqlite_claims
from hub.registry.records import (
    ConfigState,
    Credential,
    Device,
    DeviceChange,
    Presence,
    check_device_id,
    check_labels,
    config_text,
    hash_token,
)
from hub.registry.schema import CONNECTIONS_MIGRATIONS, MIGRATIONS
from hub.registry.sqlite_claims import CONNECTIONS_FILE
from hub.registry.sqlite_files import open_database, transaction

__all__ = [
    "TOKEN_PREFIX",
    "ConfigState",
    "Credential",
    "Device",
    "DeviceChange",
    "Presence",
    "Registry",
    "check_device_id",
    "check_labels",
    "hash_token",
    "new_token",
    "secure_state_dir",
]

T = TypeVar("T")

TOKEN_PREFIX = "hubt_"  # noqa: S105 (a prefix, not a secret)
BUSY_TIMEOUT_S = 10.0
"""How long a write waits for another process's write lock (SQLite's busy timeout)."""


def new_token() -> str:
    """A fresh device token: 256 random bits, URL-safe, with a recognisable prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def secure_state_dir(directory: Path) -> Path:
    """Create the state directory if needed and force its mode to 0700 (an existing one
    keeps no looser mode): it holds token hashes, the spool and dead letters."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if directory.stat().st_mode & 0o777 != 0o700:
        try:
            directory.chmod(0o700)
        except OSError as exc:
            raise RegistryError(
                f"cannot make the state directory {directory} private (mode 0700): "
                f"{exc.strerror}; it must belong to the hub's user"
            ) from None
    return directory


class Registry:
    """Devices and token hashes in one SQLite file, shared by the hub and the CLI, and the
    connections file beside it (claims, written by hub processes only)."""

    def __init__(self, path: Path) -> None:
        """Open (creating and upgrading if needed) the registry at `path`; a write waits up
        to `BUSY_TIMEOUT_S` for another process's write lock before raising."""
        secure_state_dir(path.parent)
        self.path = path
        self._db = open_database(path, MIGRATIONS, BUSY_TIMEOUT_S)
        try:
            self._connections = open_database(
                path.parent / CONNECTIONS_FILE, CONNECTIONS_MIGRATIONS, BUSY_TIMEOUT_S
            )
        except BaseException:
            self._db.close()
            raise

    def set_busy_timeout(self, seconds: float) -> None:
        """From now on, wait up to `seconds` for another process's lock before raising."""
        for db in (self._db, self._connections):
            db.execute(f"PRAGMA busy_timeout = {max(0, round(seconds * 1000))}")

    def close(self) -> None:
        """Close the database."""
        self._db.close()
        self._connections.close()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db)

    def _next_change(self, db: sqlite3.Connection) -> int:
        (seq,) = db.execute("UPDATE change_seq SET value = value + 1 RETURNING value").fetchone()
        return int(seq)

    # Devices and tokens

    def add(self, device_id: str, labels: Mapping[str, str] | None = None) -> str:
        """Register a device and return its new token (the only time it is visible)."""
        return self.add_many([check_device_id(device_id)], labels)[0]

    def add_many(self, device_ids: list[str], labels: Mapping[str, str] | None = None) -> list[str]:
        """Register several devices in one transaction; returns their tokens in order."""
        labels_json = json.dumps(check_labels(labels or {}), sort_keys=True)
        tokens = [new_token() for _ in device_ids]
        now = time.time()
        with self._transaction() as db:
            for device_id, token in zip(device_ids, tokens, strict=True):
                check_device_id(device_id)
                try:
                    db.execute(
                        "INSERT INTO devices (device_id, token_hash, created_at, labels)"
                        " VALUES (?, ?, ?, ?)",
                        (device_id, hash_token(token), now, labels_json),
                    )
                except sqlite3.IntegrityError:
                    raise DeviceExists(device_id) from None
        return tokens

    def revoke(self, device_id: str) -> None:
        """Stop accepting the device's token; a connected hub closes it with 4001."""
        with self._transaction() as db:
            self._require(db, device_id)
            db.execute(
                "UPDATE devices SET revoked_at = ?, changed_seq = ?"
                " WHERE device_id = ? AND revoked_at IS NULL",
                (time.time(), self._next_change(db), device_id),
            )

    def _require(self, db: sqlite3.Connection, device_id: str) -> None:
        if db.execute("SELECT 1 FROM devices WHERE device_id = ?", (device_id,)).fetchone() is None:
            raise UnknownDevice(device_id)

    def get(self, device_id: str) -> Device | None:
        """The device with that id, if registered."""
        row = self._db.execute(
            "SELECT device_id, created_at, revoked_at, labels FROM devices WHERE device_id = ?",
            (device_id,),
        ).fetchone()
        return _device(row) if row else None

    def devices(self) -> list[Device]:
        """Every registered device, by id."""
        rows = self._db.execute(
            "SELECT device_id, created_at, revoked_at, labels FROM devices ORDER BY device_id"
        ).fetchall()
        return [_device(row) for row in rows]

    def rotate(self, device_id: str, grace_s: float) -> str:
        """Give the device a new token; the old one keeps working for `grace_s` seconds.

        Returns the new token (the only time it is visible). With a grace period, a token
        retired by an earlier rotation keeps its own expiry; `grace_s` 0 ends every grace
        period of the device at once (the hub then closes connections using one with 4001).
        """
        if grace_s < 0:
            raise RegistryError("the grace period cannot be negative")
        token = new_token()
        now = time.time()
        with self._transaction() as db:
            row = db.execute(
                "SELECT token_hash, revoked_at FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            if row is None:
                raise UnknownDevice(device_id)
            if row[1] is not None:
                raise RegistryError(f"device {device_id!r} is revoked")
            db.execute("DELETE FROM retired_tokens WHERE expires_at <= ?", (now,))
            if grace_s == 0:
                db.execute("DELETE FROM retired_tokens WHERE device_id = ?", (device_id,))
            else:
                db.execute(
                    "INSERT INTO retired_tokens (token_hash, device_id, expires_at)"
                    " VALUES (?, ?, ?)",
                    (row[0], device_id, now + grace_s),
                )
            db.execute(
                "UPDATE devices SET token_hash = ?, changed_seq = ? WHERE device_id = ?",
                (hash_token(token), self._next_change(db), device_id),
            )
        return token

    def authenticate(self, token: str) -> str | None:
        """The id of the active device owning `token`, or None."""
        found = self.credential(hash_token(token))
        return None if found is None else found.device_id

    def credential(self, token_hash: str) -> Credential | None:
        """Whose token has this hash, if it works now: current, or retired and in its grace."""
        row = self._db.execute(
            "SELECT device_id, token_hash FROM devices WHERE token_hash = ? AND revoked_at IS NULL",
            (token_hash,),
        ).fetchone()
        if row is not None and hmac.compare_digest(row[1], token_hash):
            return Credential(str(row[0]), token_hash)
        row = self._db.execute(
            "SELECT r.device_id, r.token_hash, r.expires_at FROM retired_tokens AS r"
            " JOIN devices AS d ON d.device_id = r.device_id"
            " WHERE r.token_hash = ? AND r.expires_at > ? AND d.revoked_at IS NULL",
            (token_hash, time.time()),
        ).fetchone()
        if row is not None and hmac.compare_digest(row[1], token_hash):
            return Credential(str(row[0]), token_hash, float(row[2]))
        return None

    # Labels and selection

    def set_labels(
        self, device_id: str, labels: Mapping[str, str], remove: Iterable[str] = ()
    ) -> dict[str, str]:
        """Set and remove labels of a device; returns its labels afterwards."""
        check_labels(labels)
        with self._transaction() as db:
            self._require(db, device_id)
            (current,) = db.execute(
                "SELECT labels FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            updated = {**json.loads(current), **labels}
            for key in remove:
                updated.pop(key, None)
            db.execute(
                "UPDATE devices SET labels = ? WHERE device_id = ?",
                (json.dumps(updated, sort_keys=True), device_id),
            )
        return updated

    def select(
        self,
        device_ids: Iterable[str] = (),
        *,
        everyone: bool = False,
        labels: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Active devices named, or all of them, or those carrying every one of `labels`."""
        active = [d for d in self.devices() if d.active]
        if everyone:
            return [d.device_id for d in active]
        if labels:
            return [
                d.device_id for d in active if all(d.labels.get(k) == v for k, v in labels.items())
            ]
        by_id = {d.device_id: d for d in self.devices()}
        chosen = list(dict.fromkeys(device_ids))
        for device_id in chosen:
            device = by_id.get(device_id)
            if device is None:
                raise UnknownDevice(device_id)
            if not device.active:
                raise RegistryError(f"device {device_id!r} is revoked")
        return chosen

    # Desired configuration

    def set_config(
        self,
        device_ids: list[str],
        *,
        updates: Mapping[str, Any] | None = None,
        replace: Mapping[str, Any] | None = None,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> dict[str, int]:
        """Give devices a new desired config version: `updates` merged in, or `replace`d whole.

        Returns each device's new version. Versions only grow, across restarts too. A config
        whose `config` frame would be too large, or nest deeper than `max_depth` (the hub's
        `max_nesting_depth`), raises `RegistryError` (see `config_frame_problem`).
        """
        with self._transaction() as db:
            seq = self._next_change(db)
            versions = {}
            for device_id in device_ids:
                row = db.execute(
                    "SELECT config, config_version FROM devices WHERE device_id = ?", (device_id,)
                ).fetchone()
                if row is None:
                    raise UnknownDevice(device_id)
                config = dict(replace) if replace is not None else json.loads(row[0])
                config.update(updates or {})
                text = config_text(device_id, config, max_depth)
                versions[device_id] = row[1] + 1
                db.execute(
                    "UPDATE devices SET config = ?, config_version = ?, changed_seq = ?"
                    " WHERE device_id = ?",
                    (text, versions[device_id], seq, device_id),
                )
        return versions

    def config_state(self, device_id: str) -> ConfigState:
        """The device's desired config, its version, and its last answer."""
        states = self.config_states([device_id])
        if not states:
            raise UnknownDevice(device_id)
        return states[0]

    def config_states(self, device_ids: Iterable[str]) -> list[ConfigState]:
        """`config_state` of several devices (unknown ids are left out)."""
        # Looked up by key, a chunk at a time: the hub asks for one device on every connect,
        # and a scan of the whole table each time made a connect storm quadratic.
        wanted = list(dict.fromkeys(device_ids))
        rows: list[tuple[Any, ...]] = []
        for start in range(0, len(wanted), sqlite_claims.IDS_PER_STATEMENT):
            chunk = wanted[start : start + sqlite_claims.IDS_PER_STATEMENT]
            placeholders = ", ".join("?" * len(chunk))  # only `?`s: the ids are bound
            query = (
                "SELECT device_id, config, config_version, acked_version, ack_ok, ack_error,"  # noqa: S608
                f" acked_at FROM devices WHERE device_id IN ({placeholders})"
            )
            rows.extend(self._db.execute(query, chunk))
        rows.sort(key=lambda row: str(row[0]))
        return [
            ConfigState(
                device_id=row[0],
                config=json.loads(row[1]),
                version=row[2],
                acked_version=row[3],
                ack_ok=None if row[4] is None else bool(row[4]),
                ack_error=row[5],
                acked_at=row[6],
            )
            for row in rows
        ]

    def record_config_ack(self, device_id: str, version: int, ok: bool, error: str | None) -> bool:
        """Store a device's answer to its latest version; a stale or repeated one is ignored."""
        if not 0 <= version < 2**63:  # never sent (SQLite's INTEGER could not even hold it)
            return False
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE devices SET acked_version = ?, ack_ok = ?, ack_error = ?, acked_at = ?"
                " WHERE device_id = ? AND config_version = ?"
                " AND (acked_version IS NULL OR acked_version < ?)",
                (
                    version,
                    ok,
                    None if ok else (error or ""),
                    time.time(),
                    device_id,
                    version,
                    version,
                ),
            )
        return cursor.rowcount == 1

    # What the hub watches

    def data_version(self) -> int:
        """Changes when another connection commits (SQLite's PRAGMA data_version)."""
        (version,) = self._db.execute("PRAGMA data_version").fetchone()
        return int(version)

    def change_seq(self) -> int:
        """The latest operator change's sequence number."""
        (seq,) = self._db.execute("SELECT value FROM change_seq").fetchone()
        return int(seq)

    def changes_since(self, seq: int) -> tuple[int, list[DeviceChange]]:
        """Devices an operator changed after `seq`, and the sequence to ask from next time."""
        latest = self.change_seq()
        rows = self._db.execute(
            "SELECT device_id, config_version, revoked_at IS NOT NULL FROM devices"
            " WHERE changed_seq > ?",
            (seq,),
        ).fetchall()
        return latest, [DeviceChange(row[0], row[1], bool(row[2])) for row in rows]

    # Presence, claims and counts: hub.registry.sqlite_claims holds their SQL

    def presence(self) -> dict[str, Presence]:
        """What the hubs last recorded, per device (`sqlite_claims.presence`)."""
        return sqlite_claims.presence(self._db, self._connections)

    def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work(db)` in one write transaction of the registry file: all of it or nothing."""
        with self._transaction() as db:
            return work(db)

    def write_connections(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work(db)` in one write transaction of the connections file (claims)."""
        with transaction(self._connections) as db:
            return work(db)

    def read_connections(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work(db)` on the connections file, outside a transaction."""
        return work(self._connections)


def _device(row: tuple[Any, ...]) -> Device:
    return Device(row[0], row[1], row[2], json.loads(row[3]))
