"""Token rotation: a new token at once, the old one for a grace period the operator chooses."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer
from hub.errors import RegistryError, UnknownDevice
from hub.registry.schema import MIGRATIONS
from hub.registry.sqlite import TOKEN_PREFIX, Registry, hash_token
from tests.support import add_device, hub_settings, running_hub

WAIT_S = 10.0
DEVICE = "dev-1"
READING = {"name": "rotate_probe", "time": 1_700_000_000_000, "fields": {"value": 1.0}}


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """A fresh registry."""
    registry = Registry(tmp_path / "registry.sqlite3")
    try:
        yield registry
    finally:
        registry.close()


def wait_until_refused(registry: Registry, token: str) -> None:
    """Wait (bounded) until `token` no longer authenticates."""
    deadline = time.monotonic() + WAIT_S
    while registry.authenticate(token) is not None:
        assert time.monotonic() < deadline, "the old token still works after its grace period"
        time.sleep(0.02)


# --- Registry ----------------------------------------------------------------------------------


@pytest.mark.unit
def test_new_token_works_at_once(registry: Registry) -> None:
    """The token rotate returns authenticates as the device."""
    registry.add(DEVICE)
    assert registry.authenticate(registry.rotate(DEVICE, 3600)) == DEVICE


@pytest.mark.unit
def test_old_token_works_during_the_grace_period(registry: Registry) -> None:
    """The previous token keeps authenticating, with its expiry, during the grace period."""
    old = registry.add(DEVICE)
    registry.rotate(DEVICE, 3600)
    credential = registry.credential(hash_token(old))
    assert credential is not None and credential.device_id == DEVICE
    assert credential.expires_at is not None and credential.expires_at > time.time() + 3000


@pytest.mark.unit
def test_old_token_fails_after_the_grace_period(registry: Registry) -> None:
    """Once the grace period is over the old token fails like an unknown one."""
    old = registry.add(DEVICE)
    new = registry.rotate(DEVICE, 0.2)
    wait_until_refused(registry, old)
    assert registry.authenticate(new) == DEVICE


@pytest.mark.unit
def test_grace_zero_refuses_the_old_token_at_once(registry: Registry) -> None:
    """With no grace period the old token stops working immediately."""
    old = registry.add(DEVICE)
    registry.rotate(DEVICE, 0)
    assert registry.authenticate(old) is None


@pytest.mark.unit
def test_each_retired_token_keeps_its_own_expiry(registry: Registry) -> None:
    """Rotating twice keeps both earlier tokens working until their own expiries."""
    first = registry.add(DEVICE)
    second = registry.rotate(DEVICE, 3600)
    third = registry.rotate(DEVICE, 3600)
    assert [registry.authenticate(t) for t in (first, second, third)] == [DEVICE] * 3


@pytest.mark.unit
def test_revoking_refuses_old_and_new_tokens(registry: Registry) -> None:
    """A revoked device's retired tokens stop working along with its current one."""
    old = registry.add(DEVICE)
    new = registry.rotate(DEVICE, 3600)
    registry.revoke(DEVICE)
    assert (registry.authenticate(old), registry.authenticate(new)) == (None, None)


@pytest.mark.unit
def test_rotating_an_unknown_or_revoked_device_is_refused(registry: Registry) -> None:
    """Rotation needs a registered, active device."""
    with pytest.raises(UnknownDevice):
        registry.rotate("nobody", 60)
    registry.add(DEVICE)
    registry.revoke(DEVICE)
    with pytest.raises(RegistryError, match="revoked"):
        registry.rotate(DEVICE, 60)


@pytest.mark.integration
def test_registry_of_the_first_schema_is_migrated(tmp_path: Path) -> None:
    """A registry made before rotation existed is upgraded and its tokens keep working."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    token = TOKEN_PREFIX + "x" * 43
    db.execute(
        "INSERT INTO devices (device_id, token_hash, created_at) VALUES (?, ?, 0)",
        (DEVICE, hash_token(token)),
    )
    db.commit()
    db.close()
    registry = Registry(path)
    try:
        assert registry.authenticate(token) == DEVICE
        assert registry.authenticate(registry.rotate(DEVICE, 60)) == DEVICE
        assert registry.authenticate(token) == DEVICE
    finally:
        registry.close()


# --- CLI ---------------------------------------------------------------------------------------


def hub_cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m hub ARGS --state-dir STATE_DIR` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "hub", *args, "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.e2e
def test_cli_rotate_prints_only_the_new_token(tmp_path: Path) -> None:
    """`hub token rotate DEVICE --grace 1h`: the new token is stdout's only line."""
    old = hub_cli(tmp_path, "token", "add", DEVICE).stdout.strip()
    done = hub_cli(tmp_path, "token", "rotate", DEVICE, "--grace", "1h")
    assert done.returncode == 0, done.stderr
    new = done.stdout.strip()
    assert new.startswith(TOKEN_PREFIX) and new != old and done.stdout == new + "\n"
    assert "old token works until" in done.stderr and new not in done.stderr
    registry = Registry(tmp_path / "registry.sqlite3")
    try:
        assert (registry.authenticate(old), registry.authenticate(new)) == (DEVICE, DEVICE)
    finally:
        registry.close()


@pytest.mark.e2e
@pytest.mark.parametrize("grace", ["soon", "-1h", "1w", ""])
def test_cli_rotate_refuses_a_bad_grace(tmp_path: Path, grace: str) -> None:
    """A grace period that is not 0, Ns, Nm, Nh or Nd is refused, and nothing rotated."""
    old = hub_cli(tmp_path, "token", "add", DEVICE).stdout.strip()
    done = hub_cli(tmp_path, "token", "rotate", DEVICE, "--grace", grace)
    assert done.returncode != 0 and done.stdout == ""
    registry = Registry(tmp_path / "registry.sqlite3")
    try:
        assert registry.credential(hash_token(old)) is not None
        assert registry.credential(hash_token(old)).expires_at is None  # type: ignore[union-attr]
    finally:
        registry.close()


# --- A running hub -----------------------------------------------------------------------------


@pytest.mark.integration
async def test_connection_with_the_old_token_is_closed_when_its_grace_ends(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A device connected with a token rotated out meanwhile is closed with 4001 at expiry."""
    settings = hub_settings(tmp_path, influxdb.url, influx_bucket=influx_db_name, influx_api="v1")
    old = add_device(settings, DEVICE)
    async with running_hub(settings) as service:
        async with DeviceClient(service.url, old) as device:
            assert (await asyncio.wait_for(device.store([READING]), WAIT_S)).accepted == 1
            registry = Registry(settings.registry_path)
            try:
                new = registry.rotate(DEVICE, 0.5)
            finally:
                registry.close()
            code, reason = await asyncio.wait_for(device.wait_closed(), WAIT_S)
        assert (code, reason) == (4001, "token rotated out")
        with pytest.raises(InvalidStatus) as refused:
            await DeviceClient(service.url, old).connect()
        assert refused.value.response.status_code == 401
        async with DeviceClient(service.url, new) as device:
            assert (await asyncio.wait_for(device.store([READING]), WAIT_S)).accepted == 1


@pytest.mark.integration
async def test_old_token_connects_during_the_grace_period(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Within its grace period the old token still connects and is acked."""
    settings = hub_settings(tmp_path, influxdb.url, influx_bucket=influx_db_name, influx_api="v1")
    old = add_device(settings, DEVICE)
    registry = Registry(settings.registry_path)
    try:
        registry.rotate(DEVICE, 3600)
    finally:
        registry.close()
    async with running_hub(settings) as service, DeviceClient(service.url, old) as device:
        assert (await asyncio.wait_for(device.store([READING]), WAIT_S)).accepted == 1
