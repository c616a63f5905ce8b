"""Claims, presence and counts in the SQLite registry (hub.registry.sqlite_claims), on the
engine itself, and the schema migration that added them. What both backends must do is in
the contract (tests/registry_contract.py); these are SQLite's own cases."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.registry import sqlite_claims
from hub.registry.records import HeldSession, Presence, StaleReason
from hub.registry.schema import MIGRATIONS
from hub.registry.sqlite import Registry

pytestmark = pytest.mark.unit


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
    claim = registry.write(lambda db: sqlite_claims.claim(db, device_id, node_id, "x:1", 1.0))
    assert claim is not None
    return claim.epoch


def test_a_registry_of_the_last_version_upgrades_and_its_rows_count_as_offline(
    path: Path,
) -> None:
    """A state directory made before claims (schema 2, a device online in it) opens: the
    row is kept, offline, with its count; the first claim gets epoch 1; opening again
    changes nothing."""
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
            (version,) = registry.read(lambda db: db.execute("PRAGMA user_version").fetchone())
            assert version == len(MIGRATIONS)
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
    registry.write(lambda db: sqlite_claims.claim(db, "a", "n/1", long_address, 10.0))
    seen = registry.presence()["a"]
    assert (seen.online, seen.connected_since, seen.last_seen) == (True, 10.0, 10.0)
    assert seen.remote_address == long_address[: sqlite_claims.MAX_ADDRESS_CHARS]
    assert registry.read(sqlite_claims.holders) == {"a": "n/1"}


def test_a_flush_touches_and_releases_only_by_its_epoch(registry: Registry) -> None:
    """A session's flush updates last seen and its end releases, naming its epoch; the same
    rows of an older epoch change nothing."""
    old = claimed(registry, "a", "n/1")
    new = claimed(registry, "a", "n/1")
    stale = [
        Presence("a", True, "x:1", 1.0, 50.0, 0, old),
        Presence("a", False, "x:1", 1.0, 60.0, 0, old),
    ]
    registry.write(lambda db: sqlite_claims.record_presence(db, "n/1", stale, {}))
    assert (registry.presence()["a"].online, registry.presence()["a"].last_seen) == (True, 1.0)
    seen = [Presence("a", True, "x:1", 1.0, 70.0, 0, new)]
    registry.write(lambda db: sqlite_claims.record_presence(db, "n/1", seen, {}))
    assert registry.presence()["a"].last_seen == 70.0
    ended = [Presence("a", False, "x:1", 1.0, 80.0, 0, new)]
    registry.write(lambda db: sqlite_claims.record_presence(db, "n/1", ended, {}))
    assert (registry.presence()["a"].online, registry.presence()["a"].last_seen) == (False, 80.0)


def test_an_unclaimed_row_going_offline_never_releases_another_nodes_claim(
    registry: Registry,
) -> None:
    """A row of no claim (epoch 0) from node 1 saying offline leaves node 2's claim; from
    the holder it releases; online it takes the device (as on PostgreSQL)."""
    claimed(registry, "a", "n/2")
    offline = [Presence("a", False, "x:1", 1.0, 2.0, 0)]
    registry.write(lambda db: sqlite_claims.record_presence(db, "n/1", offline, {}))
    assert registry.read(sqlite_claims.holders) == {"a": "n/2"}
    registry.write(lambda db: sqlite_claims.record_presence(db, "n/2", offline, {}))
    assert registry.read(sqlite_claims.holders) == {}
    online = [Presence("b", True, "x:2", 1.0, 2.0, 0)]
    registry.write(lambda db: sqlite_claims.record_presence(db, "n/1", online, {}))
    assert registry.read(sqlite_claims.holders) == {"b": "n/1"}


def test_counts_add_deltas_skipping_unknown_devices_and_non_positive_ones(
    registry: Registry,
) -> None:
    """Deltas add to each device's count, creating its row; an unknown device, a zero and
    a negative delta change nothing and fail nothing."""
    registry.write(lambda db: sqlite_claims.add_stored(db, {"a": 5, "ghost": 3, "b": 0}))
    registry.write(lambda db: sqlite_claims.add_stored(db, {"a": 2, "b": -4}))
    assert {d: p.readings_stored for d, p in registry.presence().items()} == {"a": 7}
    unknown = [Presence("ghost", True, None, None, None, 0)]
    registry.write(lambda db: sqlite_claims.record_presence(db, "n/1", unknown, {}))
    assert "ghost" not in registry.presence()


def test_releasing_nodes_ends_only_their_claims(registry: Registry) -> None:
    """Releasing a dead worker's node id frees its devices, not its sibling's; None frees
    every claim (a hub of its own starting); epochs stay where they were."""
    claimed(registry, "a", "n/1")
    epoch_b = claimed(registry, "b", "n/2")
    assert registry.write(lambda db: sqlite_claims.release_nodes(db, ["n/1", "n/9"])) == 1
    assert registry.read(sqlite_claims.holders) == {"b": "n/2"}
    assert registry.write(lambda db: sqlite_claims.release_nodes(db, None)) == 1
    assert registry.read(sqlite_claims.holders) == {}
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
    stale = registry.read(lambda db: sqlite_claims.taken_over(db, "n/1", held))
    assert {s.device_id for s in stale} == moved | {renewed}
    assert {s.reason for s in stale} == {StaleReason.TAKEN_OVER}
    by_device = {s.device_id: s.epoch for s in stale}
    assert all(by_device[s.device_id] == s.epoch for s in held if s.device_id in by_device)
    assert registry.read(lambda db: sqlite_claims.taken_over(db, "n/2", [])) == []


def test_a_config_answer_held_by_a_claim_counts_only_while_it_holds(registry: Registry) -> None:
    """An answer naming (node, epoch) is stored while that claim holds the device; after
    another claim it is not, and the newer claim's is."""
    version = registry.set_config(["a"], updates={"x": 1})["a"]
    old = claimed(registry, "a", "n/1")
    new = claimed(registry, "a", "n/2")
    assert not registry.record_config_ack("a", version, True, None, held_by=("n/1", old))
    assert registry.config_state("a").acked_version is None
    assert registry.record_config_ack("a", version, True, None, held_by=("n/2", new))
    assert registry.config_state("a").acked_version == version
