"""Claims, presence and counts in the SQLite registry (hub.registry.sqlite_claims), on the
engine itself and through the hub's ports, and an older state directory opening. What both
backends must do is in the contract (tests/registry_contract.py); these are SQLite's own
cases."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.registry import sqlite_claims
from hub.registry.records import HeldSession, Presence, StaleReason
from hub.registry.schema import MIGRATIONS
from hub.registry.sqlite import Registry
from hub.registry.thread import ThreadedSQLiteRegistry

pytestmark = pytest.mark.unit

WAIT_S = 10.0
PROMPT_S = 1.0
"""Bound on two claims while the registry file is locked: milliseconds here; with claims in
the locked file they waited for the lock (seconds, up to SQLite's busy timeout)."""


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """Where the test's registry lives."""
    return tmp_path / "state" / "registry.sqlite3"


@pytest.fixture
def registry(path: Path) -> Iterator[Registry]:
    """A fresh registry with devices a and b."""
    registry = Registry(path)
    registry.add_many(["a", "b"])
    yield registry
    registry.close()


def claimed(registry: Registry, device_id: str, node_id: str) -> int:
    """Claim the device for `node_id`; its epoch."""
    claim = registry.write_connections(
        lambda db: sqlite_claims.claim(db, device_id, node_id, "x:1", 1.0)
    )
    return claim.epoch


def sessions(registry: Registry, node_id: str, rows: list[Presence]) -> None:
    """Node `node_id`'s flush of these rows to the connections file."""
    registry.write_connections(lambda db: sqlite_claims.record_sessions(db, node_id, rows))


def holders(registry: Registry) -> dict[str, str]:
    """Who holds what."""
    return registry.read_connections(sqlite_claims.holders)


def test_a_state_directory_from_before_claims_opens_with_its_rows_offline(
    path: Path,
) -> None:
    """A registry made before claims (schema 2, a device online in it) opens: the row is
    kept, offline, with its count; the connections file is made (0600); the first claim
    gets epoch 1; opening again changes nothing."""
    path.parent.mkdir(mode=0o700)
    old = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(MIGRATIONS[:2], start=1):
        old.executescript(script)
        old.execute(f"PRAGMA user_version = {number}")
    old.execute("INSERT INTO devices (device_id, token_hash, created_at) VALUES ('a', 'h', 0)")
    old.execute(
        "INSERT INTO presence (device_id, online, remote_address, connected_since, last_seen,"
        " readings_stored) VALUES ('a', 1, '10.0.0.1:1', 5.0, 6.0, 42)"
    )
    old.close()
    for _ in range(2):
        registry = Registry(path)
        try:
            assert registry.presence() == {"a": Presence("a", False, "10.0.0.1:1", 5.0, 6.0, 42)}
            assert (path.parent / sqlite_claims.CONNECTIONS_FILE).stat().st_mode & 0o777 == 0o600
        finally:
            registry.close()
    registry = Registry(path)
    try:
        assert claimed(registry, "a", "n/1") == 1
        assert registry.presence()["a"].readings_stored == 42
    finally:
        registry.close()


def test_a_claim_records_who_holds_the_device_from_where(registry: Registry) -> None:
    """A claim alone shows the device online, held by its node, from its address (the
    presence flush comes later); the address is cut to the stored bound."""
    long_address = "192.0.2.1:" + "9" * 400
    registry.write_connections(lambda db: sqlite_claims.claim(db, "a", "n/1", long_address, 10.0))
    seen = registry.presence()["a"]
    assert (seen.online, seen.connected_since, seen.last_seen) == (True, 10.0, 10.0)
    assert seen.remote_address == long_address[: sqlite_claims.MAX_ADDRESS_CHARS]
    assert holders(registry) == {"a": "n/1"}


def test_a_flush_touches_and_releases_only_by_its_epoch(registry: Registry) -> None:
    """A session's flush updates last seen and its end releases, naming its epoch; the same
    rows of an older epoch change nothing."""
    old = claimed(registry, "a", "n/1")
    new = claimed(registry, "a", "n/1")
    stale = [
        Presence("a", True, "x:1", 1.0, 50.0, 0, old),
        Presence("a", False, "x:1", 1.0, 60.0, 0, old),
    ]
    sessions(registry, "n/1", stale)
    assert (registry.presence()["a"].online, registry.presence()["a"].last_seen) == (True, 1.0)
    seen = [Presence("a", True, "x:1", 1.0, 70.0, 0, new)]
    sessions(registry, "n/1", seen)
    assert registry.presence()["a"].last_seen == 70.0
    ended = [Presence("a", False, "x:1", 1.0, 80.0, 0, new)]
    sessions(registry, "n/1", ended)
    assert (registry.presence()["a"].online, registry.presence()["a"].last_seen) == (False, 80.0)


def test_an_unclaimed_row_going_offline_never_releases_another_nodes_claim(
    registry: Registry,
) -> None:
    """A row of no claim (epoch 0) from node 1 saying offline leaves node 2's claim; from
    the holder it releases; online it takes the device (as on PostgreSQL)."""
    claimed(registry, "a", "n/2")
    offline = [Presence("a", False, "x:1", 1.0, 2.0, 0)]
    sessions(registry, "n/1", offline)
    assert holders(registry) == {"a": "n/2"}
    sessions(registry, "n/2", offline)
    assert holders(registry) == {}
    online = [Presence("b", True, "x:2", 1.0, 2.0, 0)]
    sessions(registry, "n/1", online)
    assert holders(registry) == {"b": "n/1"}


def test_counts_add_deltas_skipping_unknown_devices_and_non_positive_ones(
    registry: Registry,
) -> None:
    """Deltas add to each device's count, creating its row; an unknown device, a zero and
    a negative delta change nothing and fail nothing."""
    registry.write(lambda db: sqlite_claims.add_stored(db, {"a": 5, "ghost": 3, "b": 0}))
    registry.write(lambda db: sqlite_claims.add_stored(db, {"a": 2, "b": -4}))
    assert {d: p.readings_stored for d, p in registry.presence().items()} == {"a": 7}


def test_releasing_nodes_ends_only_their_claims(registry: Registry) -> None:
    """Releasing a dead worker's node id frees its devices, not its sibling's; None frees
    every claim (a hub of its own starting); epochs stay where they were."""
    claimed(registry, "a", "n/1")
    epoch_b = claimed(registry, "b", "n/2")
    assert (
        registry.write_connections(lambda db: sqlite_claims.release_nodes(db, ["n/1", "n/9"])) == 1
    )
    assert holders(registry) == {"b": "n/2"}
    assert registry.write_connections(lambda db: sqlite_claims.release_nodes(db, None)) == 1
    assert holders(registry) == {}
    assert claimed(registry, "b", "n/1") == epoch_b + 1


def test_the_safety_net_finds_every_session_taken_over_among_many(registry: Registry) -> None:
    """More sessions than one statement takes: exactly those whose claim another node (or
    a newer claim of the same node) took are named, with their epochs."""
    ids = [f"d{n:04}" for n in range(1200)]
    registry.add_many(ids)
    held = [HeldSession(d, claimed(registry, d, "n/1"), 0, "h") for d in ids]
    moved = set(ids[::7])
    for device_id in moved:
        claimed(registry, device_id, "n/2")
    renewed = ids[1]  # claimed again by n/1 itself: the held session is stale all the same
    claimed(registry, renewed, "n/1")
    stale = registry.read_connections(lambda db: sqlite_claims.taken_over(db, "n/1", held))
    assert {s.device_id for s in stale} == moved | {renewed}
    assert {s.reason for s in stale} == {StaleReason.TAKEN_OVER}
    by_device = {s.device_id: s.epoch for s in stale}
    assert all(by_device[s.device_id] == s.epoch for s in held if s.device_id in by_device)
    assert registry.read_connections(lambda db: sqlite_claims.taken_over(db, "n/2", [])) == []


async def test_a_claim_is_not_held_up_by_an_operators_long_transaction(path: Path) -> None:
    """While another connection holds the registry file's write lock (a CLI's `token add
    --count 10000`), a handshake's claim through the hub's ports answers at once (printed)
    and a config answer of a claimed session that lost its claim is refused at once too;
    one that holds it is stored once the lock is gone."""
    setup = Registry(path)
    setup.add_many(["a", "b"])
    version = setup.set_config(["a"], updates={"x": 1})["a"]
    setup.close()
    ports = await ThreadedSQLiteRegistry.open(path, 0.01, "n/1")
    other = await ThreadedSQLiteRegistry.open(path, 0.01, "n/2")
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        old = await ports.claim("b", "192.0.2.1:1")
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        claim = await asyncio.wait_for(ports.claim("a", "192.0.2.1:2"), WAIT_S)
        taken = await asyncio.wait_for(other.claim("b", "192.0.2.2:1"), WAIT_S)
        claim_s = time.monotonic() - started
        assert claim is not None and taken is not None and old is not None
        assert taken.previous_owner == "n/1"
        lost = ports.record_claimed_config_ack("b", old.epoch, version, True, None)
        assert not await asyncio.wait_for(lost, WAIT_S)
        answer = asyncio.ensure_future(
            ports.record_claimed_config_ack("a", claim.epoch, version, True, None)
        )
        await asyncio.sleep(0.2)
        assert not answer.done()  # its write waits for the lock, as every write does
        holder.execute("ROLLBACK")
        assert await asyncio.wait_for(answer, WAIT_S)
        print(f"claims with the registry file locked: {claim_s * 1000:.1f} ms for two")
        assert claim_s < PROMPT_S
    finally:
        holder.close()
        await other.close()
        await ports.close()


def test_only_the_newest_claim_holds_the_device(registry: Registry) -> None:
    """`holds` is true for the newest claim's (node, epoch) only."""
    old = claimed(registry, "a", "n/1")
    new = claimed(registry, "a", "n/2")
    assert not registry.read_connections(lambda db: sqlite_claims.holds(db, "a", "n/1", old))
    assert not registry.read_connections(lambda db: sqlite_claims.holds(db, "a", "n/1", new))
    assert registry.read_connections(lambda db: sqlite_claims.holds(db, "a", "n/2", new))
