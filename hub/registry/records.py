"""What the registry stores and answers, whatever backend stores it.

These records cross the registry's ports (hub.registry.ports): the SQLite backend builds
them today, a PostgreSQL one will build the same. Token hashing lives here too, since every
backend looks tokens up by the same hash.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hub.core.protocol import config_frame_problem
from hub.errors import RegistryError

DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
LABEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class Device:
    """A registered device, without its token."""

    device_id: str
    created_at: float
    revoked_at: float | None
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Whether its token is accepted."""
        return self.revoked_at is None


@dataclass(frozen=True, slots=True)
class Credential:
    """The device a token belongs to; `expires_at` is set while a rotated-out token still works."""

    device_id: str
    token_hash: str
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class ConfigState:
    """A device's desired configuration and what it last acknowledged."""

    device_id: str
    config: dict[str, Any]
    version: int
    acked_version: int | None
    ack_ok: bool | None
    ack_error: str | None
    acked_at: float | None

    @property
    def pending(self) -> bool:
        """Whether the latest version still waits for the device's answer."""
        return self.version > 0 and (self.acked_version or 0) < self.version


@dataclass(frozen=True, slots=True)
class DeviceChange:
    """What the hub must act on for a device an operator changed."""

    device_id: str
    config_version: int
    revoked: bool
    token_changed: bool = True
    """Whether its tokens may have changed (rotated): its session checks its token again.
    False only when the backend knows the change was a config push alone."""


@dataclass(frozen=True, slots=True)
class Presence:
    """A device's connection state as the hub last recorded it."""

    device_id: str
    online: bool
    remote_address: str | None
    connected_since: float | None
    last_seen: float | None
    readings_stored: int
    epoch: int = 0
    """The epoch of the session this row is about (`Claim.epoch`); 0 for a device not
    claimed (admitted from memory while the registry was away): recorded by device then."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A handshake's claim of its device's one live connection across hubs."""

    epoch: int
    """Only grows per device; every later action of the session names it (0: unclaimed)."""
    previous_owner: str | None = None
    """The node it took the device from (None: nobody held it, or this node itself)."""


@dataclass(frozen=True, slots=True)
class HeldSession:
    """A live session as the safety net checks it (`OwnershipStore.stale_sessions`)."""

    device_id: str
    epoch: int
    config_version: int
    """The newest config version the session sent or found already answered."""
    token_hash: str


class StaleReason(StrEnum):
    """Why a held session must be acted on."""

    REVOKED = "revoked"  # close with 4001
    TAKEN_OVER = "taken_over"  # another handshake claimed the device since: close with 4000
    TOKEN_RETIRED = "token_retired"  # noqa: S105 (a reason, not a secret); rotated out, its grace over: close with 4001
    CONFIG = "config"  # a newer config than the session knows: push it


@dataclass(frozen=True, slots=True)
class StaleSession:
    """A held session the safety net found stale, and why."""

    device_id: str
    epoch: int
    reason: StaleReason
    config_version: int


@dataclass(frozen=True, slots=True)
class Node:
    """A hub process sharing a PostgreSQL registry, as its heartbeats last left it."""

    node_id: str
    address: str
    started_at: float
    heartbeat_at: float
    lease_expires_at: float
    live_connections: int
    live: bool


def hash_token(token: str) -> str:
    """The form in which a token is stored and looked up."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_device_id(device_id: str) -> str:
    """Return `device_id` if it is usable as an id (and as the `device` tag), else raise."""
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise RegistryError(
            f"invalid device id {device_id[:140]!r}: 1-128 characters of letters, digits and "
            "._:- starting with a letter or digit"
        )
    return device_id


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Return `labels` if every key is a valid label name and every value short, else raise."""
    for key, value in labels.items():
        if not LABEL_PATTERN.fullmatch(key):
            raise RegistryError(
                f"invalid label name {key[:80]!r}: 1-64 letters, digits and ._- characters"
            )
        if len(value) > 256 or "\n" in value:
            raise RegistryError(f"label {key!r}: values are one line of at most 256 characters")
    return dict(labels)


def config_text(device_id: str, config: dict[str, Any], max_depth: int) -> str:
    """The config as stored (JSON), refused if JSON cannot store it or the hub could not send
    it (`config_frame_problem`: msgpack, size, nesting).

    NaN and infinities are not JSON; integers outside -2**63 .. 2**64-1 are not msgpack, and
    the hub could never send them (each connection of the device would end in an error).
    """
    try:
        text = json.dumps(config, sort_keys=True, allow_nan=False)
    except (ValueError, OverflowError, TypeError) as exc:
        raise RegistryError(f"config of {device_id!r} cannot be sent to a device: {exc}") from None
    problem = config_frame_problem(config, max_depth)
    if problem is not None:
        raise RegistryError(f"config of {device_id!r} cannot be sent to a device: {problem}")
    return text
