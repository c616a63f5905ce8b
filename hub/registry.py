"""The device registry: devices and their tokens, in SQLite in the hub's state directory.

Tokens are 256 random bits, shown once when issued and stored only as their SHA-256. A slow
password hash buys nothing for secrets this long; a fast one keeps a connect storm cheap.
The lookup goes by hash, so how long it takes says nothing about any stored token, and the
found hash is compared again with `hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hub.errors import DeviceExists, RegistryError, UnknownDevice

TOKEN_PREFIX = "hubt_"  # noqa: S105 (a prefix, not a secret)
DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id   TEXT PRIMARY KEY,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  REAL NOT NULL,
    revoked_at  REAL
);
"""


@dataclass(frozen=True, slots=True)
class Device:
    """A registered device, without its token."""

    device_id: str
    created_at: float
    revoked_at: float | None

    @property
    def active(self) -> bool:
        """Whether its token is accepted."""
        return self.revoked_at is None


def hash_token(token: str) -> str:
    """The form in which a token is stored and looked up."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    """A fresh device token: 256 random bits, URL-safe, with a recognisable prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def check_device_id(device_id: str) -> str:
    """Return `device_id` if it is usable as an id (and as the `device` tag), else raise."""
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise RegistryError(
            f"invalid device id {device_id[:140]!r}: 1-128 characters of letters, digits and "
            "._:- starting with a letter or digit"
        )
    return device_id


class Registry:
    """Devices and token hashes in one SQLite file, shared by the hub and the CLI."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        # autocommit off; every change goes through _transaction. WAL lets the CLI write
        # while the hub reads.
        self._db = sqlite3.connect(path, timeout=10, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        path.chmod(0o600)

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def add(self, device_id: str) -> str:
        """Register a device and return its new token (the only time it is visible)."""
        return self.add_many([check_device_id(device_id)])[0]

    def add_many(self, device_ids: list[str]) -> list[str]:
        """Register several devices in one transaction; returns their tokens in order."""
        tokens = [new_token() for _ in device_ids]
        now = time.time()
        with self._transaction() as db:
            for device_id, token in zip(device_ids, tokens, strict=True):
                check_device_id(device_id)
                try:
                    db.execute(
                        "INSERT INTO devices (device_id, token_hash, created_at) VALUES (?, ?, ?)",
                        (device_id, hash_token(token), now),
                    )
                except sqlite3.IntegrityError:
                    raise DeviceExists(device_id) from None
        return tokens

    def revoke(self, device_id: str) -> None:
        """Stop accepting the device's token; the device stays listed as revoked."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE devices SET revoked_at = ? WHERE device_id = ? AND revoked_at IS NULL",
                (time.time(), device_id),
            )
            if cursor.rowcount == 0 and self.get(device_id) is None:
                raise UnknownDevice(device_id)

    def get(self, device_id: str) -> Device | None:
        """The device with that id, if registered."""
        row = self._db.execute(
            "SELECT device_id, created_at, revoked_at FROM devices WHERE device_id = ?",
            (device_id,),
        ).fetchone()
        return Device(*row) if row else None

    def devices(self) -> list[Device]:
        """Every registered device, by id."""
        rows = self._db.execute(
            "SELECT device_id, created_at, revoked_at FROM devices ORDER BY device_id"
        ).fetchall()
        return [Device(*row) for row in rows]

    def authenticate(self, token: str) -> str | None:
        """The id of the active device owning `token`, or None."""
        wanted = hash_token(token)
        row = self._db.execute(
            "SELECT device_id, token_hash FROM devices WHERE token_hash = ? AND revoked_at IS NULL",
            (wanted,),
        ).fetchone()
        if row is None or not hmac.compare_digest(row[1], wanted):
            return None
        return str(row[0])
