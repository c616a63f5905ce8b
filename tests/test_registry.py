"""The SQLite device registry and its tokens."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from hub.errors import DeviceExists, RegistryError, UnknownDevice
from hub.registry.sqlite import Registry, hash_token


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "state" / "registry.sqlite3")


@pytest.mark.unit
def test_token_authenticates_its_device(registry: Registry) -> None:
    """A new token authenticates as exactly its device."""
    token = registry.add("sensor-1")
    registry.add("sensor-2")
    assert registry.authenticate(token) == "sensor-1"


@pytest.mark.unit
def test_tokens_are_long_and_random(registry: Registry) -> None:
    """Tokens carry at least 128 bits and never repeat."""
    tokens = registry.add_many([f"d{i}" for i in range(100)])
    assert len(set(tokens)) == 100
    assert all(len(t) >= 40 for t in tokens)


@pytest.mark.integration
def test_only_hashes_are_stored(registry: Registry) -> None:
    """The database holds the token's hash, never the token."""
    token = registry.add("sensor-1")
    raw = registry.path.read_bytes() + Path(f"{registry.path}-wal").read_bytes()
    assert token.encode() not in raw
    stored = sqlite3.connect(registry.path).execute("SELECT token_hash FROM devices").fetchone()
    assert stored == (hash_token(token),)


@pytest.mark.unit
def test_unknown_and_revoked_tokens_fail(registry: Registry) -> None:
    """An unknown token and a revoked one both authenticate as nobody."""
    token = registry.add("sensor-1")
    assert registry.authenticate(token + "x") is None
    registry.revoke("sensor-1")
    assert registry.authenticate(token) is None
    device = registry.get("sensor-1")
    assert device is not None and not device.active


@pytest.mark.unit
def test_duplicate_device_is_refused(registry: Registry) -> None:
    """Adding an existing device id fails and keeps the first token working."""
    token = registry.add("sensor-1")
    with pytest.raises(DeviceExists):
        registry.add("sensor-1")
    assert registry.authenticate(token) == "sensor-1"


@pytest.mark.unit
def test_revoking_unknown_device_fails(registry: Registry) -> None:
    """Revoking a device that does not exist says so."""
    with pytest.raises(UnknownDevice):
        registry.revoke("ghost")


@pytest.mark.unit
@pytest.mark.parametrize("bad", ["", "a b", "x" * 129, "-lead", "tab\t", "new\nline", "é"])
def test_device_ids_are_restricted(registry: Registry, bad: str) -> None:
    """Device ids that would make awkward tags are refused."""
    with pytest.raises(RegistryError, match="invalid device id"):
        registry.add(bad)


@pytest.mark.unit
def test_registry_file_is_private(registry: Registry) -> None:
    """The registry file is readable by its owner only."""
    assert registry.path.stat().st_mode & 0o077 == 0
