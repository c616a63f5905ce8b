"""The PostgreSQL backend beyond the contract: its doorbell, its counters, its lease, bulk
commands, and what a database it cannot use looks like. Real PostgreSQL 15, fresh database
per test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import asyncpg
import pytest

from device_sim.local_servers import free_port
from device_sim.servers.postgres import PostgresDatabase
from hub.cli.top import read_presence
from hub.errors import DeviceExists, RegistryError, RegistryUnavailable
from hub.registry.postgres import backend as backend_module
from hub.registry.postgres import operator as operator_module
from hub.registry.postgres.answers import ConfigAnswers
from hub.registry.postgres.backend import PostgresRegistry
from hub.registry.postgres.doorbell import LISTENER_NAME
from hub.registry.postgres.lease import LEASE_S
from hub.registry.postgres.operator import PostgresOperator
from hub.registry.records import Presence, hash_token
from hub.settings import load_settings

pytestmark = pytest.mark.integration

WAIT_S = 10.0
"""Bound for what happens at once: a hang fails, a loaded machine does not."""
NEVER_S = 3600.0
"""A catch-up interval no test outlives: only the doorbell or a reconnection can ring."""


@pytest.fixture
async def operator(postgres_db: PostgresDatabase) -> AsyncIterator[PostgresOperator]:
    """The CLI's port on a fresh database (migrated by opening it)."""
    port = await PostgresOperator.open(postgres_db.dsn)
    try:
        yield port
    finally:
        await port.close()


async def open_node(
    database: PostgresDatabase, node_id: str, catch_up_s: float = NEVER_S
) -> PostgresRegistry:
    """A hub's registry as node `node_id`, its doorbell listening."""
    registry = await PostgresRegistry.open(
        database.dsn, node_id, "127.0.0.1:8765", catch_up_s=catch_up_s
    )
    await asyncio.wait_for(registry.listening(), WAIT_S)
    return registry


def online(device_id: str, stored: int = 0) -> Presence:
    """A device connected now, with `stored` readings as the hub counts them."""
    now = time.time()
    return Presence(device_id, True, "192.0.2.1:4000", now, now, stored)


async def test_the_doorbell_wakes_the_hub_holding_the_device(
    postgres_db: PostgresDatabase, operator: PostgresOperator
) -> None:
    """A push to a device rings its hub's channel: the wait ends at once, with no catch-up
    read for an hour, and the other hub is not rung."""
    await operator.add_many(["a"])
    holder = await open_node(postgres_db, "hub-1")
    other = await open_node(postgres_db, "hub-2")
    try:
        await holder.record_presence([online("a")])
        started = time.monotonic()
        await operator.set_config(["a"], updates={"x": 1})
        assert await holder.wait_for_change(WAIT_S)
        print(f"doorbell: woke {(time.monotonic() - started) * 1000:.1f} ms after the push")
        assert not await other.wait_for_change(0.3)
    finally:
        await holder.close()
        await other.close()


async def test_a_change_nobody_rang_for_is_found_after_the_listener_reconnects(
    postgres_db: PostgresDatabase, operator: PostgresOperator, pg: asyncpg.Connection
) -> None:
    """The tables are the truth: a change committed without a doorbell (no hub held the
    device) is signalled once the listener's connection is cut and opened again."""
    await operator.add_many(["a"])
    hub = await open_node(postgres_db, "hub-1")
    try:
        await operator.revoke("a")
        assert not await hub.wait_for_change(0.3)  # no doorbell, no catch-up yet
        await hub.record_presence([online("a")])  # now it holds the device
        cut = await pg.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = $1 AND datname = current_database()",
            LISTENER_NAME,
        )
        assert cut == 1
        assert await hub.wait_for_change(WAIT_S)
        latest, changes = await hub.changes_since(0)
        assert [(c.device_id, c.revoked) for c in changes] == [("a", True)]
        assert latest == await hub.change_seq()
    finally:
        await hub.close()


async def test_the_periodic_catch_up_bounds_a_lost_doorbell(
    postgres_db: PostgresDatabase, operator: PostgresOperator
) -> None:
    """With no doorbell at all, the doorbell's own read of the change sequence rings within
    its interval, once per change."""
    await operator.add_many(["a"])
    hub = await open_node(postgres_db, "hub-1", catch_up_s=0.2)
    try:
        started = time.monotonic()
        await operator.set_config(["a"], updates={"x": 1})
        assert await hub.wait_for_change(WAIT_S)
        print(f"catch-up: rang {(time.monotonic() - started) * 1000:.0f} ms after the push")
        assert not await hub.wait_for_change(0.6)  # three catch-ups, nothing new
    finally:
        await hub.close()


async def test_each_hubs_feed_reads_only_the_devices_it_holds(
    postgres_db: PostgresDatabase, operator: PostgresOperator
) -> None:
    """A push to the whole fleet: each hub's feed hands it the devices it holds (claimed
    at their handshakes), a page at a time past a full page, each device once with its
    newest version; a revocation in the same read wins."""
    ids = [f"d{n:03d}" for n in range(30)]
    await operator.add_many(ids)
    hubs = [await open_node(postgres_db, f"hub-{n}") for n in (1, 2, 3)]
    try:
        held: list[set[str]] = [set(), set(), set()]
        for n, device_id in enumerate(ids):
            assert await hubs[n % 3].claim(device_id, "192.0.2.1:1") is not None
            held[n % 3].add(device_id)
        seen = [await hub.change_seq() for hub in hubs]
        await operator.set_config(ids, updates={"x": 1})
        await operator.set_config(ids[:6], updates={"x": 2})
        await operator.revoke(ids[0])
        for n, hub in enumerate(hubs):
            latest, changes = await hub.changes_since(seen[n])
            assert latest == await hub.change_seq()
            assert {c.device_id for c in changes} == held[n]
            for change in changes:
                index = ids.index(change.device_id)
                expected = (2 if index < 6 else 1, index == 0)
                assert (change.config_version, change.revoked) == expected, change
            assert await hub.changes_since(latest) == (latest, [])
        # Pages of 4 rows walk the same 10 devices (16 change rows) of hub-1.
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(backend_module, "FEED_PAGE_ROWS", 4)
            _, paged = await hubs[0].changes_since(seen[0])
        assert {c.device_id for c in paged} == held[0]
        # By the owner when read: a device claimed since (it moved) comes with its changes.
        assert await hubs[0].claim(ids[1], "192.0.2.1:2") is not None
        _, moved = await hubs[0].changes_since(seen[0])
        assert {c.device_id for c in moved} == held[0] | {ids[1]}
        _, left = await hubs[1].changes_since(seen[1])
        assert {c.device_id for c in left} == held[1] - {ids[1]}
    finally:
        for hub in hubs:
            await hub.close()


async def test_the_feed_says_which_changes_may_have_touched_tokens(
    postgres_db: PostgresDatabase, operator: PostgresOperator
) -> None:
    """A config push alone needs no token check on the device's session; a rotation, or a
    push folded with one, does (the watcher re-checks only then)."""
    await operator.add_many(["pushed", "rotated", "both"])
    hub = await open_node(postgres_db, "hub-1")
    try:
        for device_id in ("pushed", "rotated", "both"):
            assert await hub.claim(device_id, "192.0.2.1:1") is not None
        seen = await hub.change_seq()
        await operator.set_config(["pushed", "both"], updates={"x": 1})
        await operator.rotate("rotated", 60.0)
        await operator.rotate("both", 60.0)
        _, changes = await hub.changes_since(seen)
        assert {c.device_id: (c.config_version, c.token_changed) for c in changes} == {
            "pushed": (1, False),
            "rotated": (0, True),
            "both": (1, True),
        }
    finally:
        await hub.close()


async def test_a_device_served_without_a_claim_gets_the_changes_it_missed(
    postgres_db: PostgresDatabase, operator: PostgresOperator
) -> None:
    """A session let in from memory (no claim, epoch 0) is not in the owner-filtered feed
    until its presence makes this hub its holder: the feed then reports the device once, as
    it is, rung at once when the feed had already passed one of its changes."""
    await operator.add_many(["a", "b"])
    hub = await open_node(postgres_db, "hub-1")
    try:
        start = await hub.change_seq()
        await operator.set_config(["a"], updates={"x": 1})
        latest, changes = await hub.changes_since(start)  # as the catch-up's read would
        assert changes == []  # nobody holds "a"
        await hub.record_presence([online("a")])
        assert await hub.wait_for_change(WAIT_S)
        _, changes = await hub.changes_since(latest)
        assert [(c.device_id, c.config_version, c.revoked) for c in changes] == [("a", 1, False)]
        assert await hub.changes_since(latest) == (latest, [])  # reported once
        await hub.record_presence([online("a", stored=1)])  # the same session: no report
        await hub.record_presence([online("b")])  # never changed: no ring
        assert not await hub.wait_for_change(0.3)
        _, changes = await hub.changes_since(latest)
        assert [(c.device_id, c.config_version) for c in changes] == [("b", 0)]
    finally:
        await hub.close()


async def test_readings_stored_add_up_across_hubs(
    postgres_db: PostgresDatabase, operator: PostgresOperator
) -> None:
    """Each hub records its totals; the registry adds their deltas, overwriting nobody."""
    await operator.add_many(["d"])
    first = await open_node(postgres_db, "hub-1")
    second = await open_node(postgres_db, "hub-2")
    try:
        assert await first.presence() == {} and await second.presence() == {}
        await first.record_presence([online("d", stored=5)])
        await second.record_presence([online("d", stored=3)])
        await first.record_presence([online("d", stored=7)])
        assert (await operator.presence())["d"].readings_stored == 10
        await second.record_presence([online("d", stored=3)])  # nothing new: adds nothing
        assert (await operator.presence())["d"].readings_stored == 10
        restarted = await open_node(postgres_db, "hub-1")  # continues from the sum
        try:
            await restarted.mark_all_offline()
            base = (await restarted.presence())["d"].readings_stored
            await restarted.record_presence([online("d", stored=base + 1)])
            assert (await operator.presence())["d"].readings_stored == 11
        finally:
            await restarted.close()
    finally:
        await first.close()
        await second.close()


async def test_marking_offline_releases_only_this_hubs_devices(
    postgres_db: PostgresDatabase, operator: PostgresOperator
) -> None:
    """A hub starting again forgets its own connections, not another hub's."""
    await operator.add_many(["a", "b"])
    first = await open_node(postgres_db, "hub-1")
    second = await open_node(postgres_db, "hub-2")
    try:
        await first.record_presence([online("a")])
        await second.record_presence([online("b")])
        assert await operator.holders() == {"a": "hub-1", "b": "hub-2"}
        await first.mark_all_offline()
        seen = await operator.presence()
        assert (seen["a"].online, seen["b"].online) == (False, True)
        assert await operator.holders() == {"b": "hub-2"}
    finally:
        await first.close()
        await second.close()


async def test_a_stopped_hubs_devices_go_offline_when_its_lease_runs_out(
    postgres_db: PostgresDatabase, operator: PostgresOperator
) -> None:
    """Online is derived from the owner's lease: a hub that stops beating (dies) leaves its
    devices offline a lease later, with nobody cleaning up."""
    await operator.add_many(["a"])
    hub = await open_node(postgres_db, "hub-1")
    await hub.record_presence([online("a")])
    assert (await operator.presence())["a"].online
    deadline = time.monotonic() + WAIT_S
    while (await operator.nodes())[0].live_connections != 1:  # a heartbeat reported it
        assert time.monotonic() < deadline, "no heartbeat reported the connection"
        await asyncio.sleep(0.1)
    await hub.close()  # no offline flush: as if it died
    stopped = time.monotonic()
    deadline = stopped + LEASE_S + WAIT_S
    while (await operator.presence())["a"].online:
        assert time.monotonic() < deadline, "still online long after the lease"
        await asyncio.sleep(0.1)
    print(f"lease: offline {time.monotonic() - stopped:.1f} s after the last heartbeat")
    (node,) = await operator.nodes()
    assert (node.node_id, node.live, node.live_connections) == ("hub-1", False, 1)
    assert await operator.holders() == {}


async def test_bulk_registration_goes_in_chunks_all_or_nothing(
    operator: PostgresOperator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many devices register a chunk per statement in one transaction; a duplicate in the
    last chunk registers none of them."""
    monkeypatch.setattr(operator_module, "CHUNK", 7)
    ids = [f"sim-{n:03d}" for n in range(30)]
    tokens = await operator.add_many(ids[:20], {"site": "north"})
    assert len(set(tokens)) == 20
    assert [d.device_id for d in await operator.devices()] == ids[:20]
    with pytest.raises(DeviceExists, match="sim-019"):
        await operator.add_many([*ids[20:], "sim-019"])
    assert len(await operator.devices()) == 20
    assert await operator.select(labels={"site": "north"}) == ids[:20]


async def test_a_fleet_push_goes_in_chunks_and_checks_every_merged_config(
    operator: PostgresOperator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--all` gives every device a new version; a merge that makes one device's config
    unsendable changes no device at all."""
    monkeypatch.setattr(operator_module, "CHUNK", 4)
    ids = [f"d{n:02d}" for n in range(10)]
    await operator.add_many(ids)
    await operator.set_config(["d07"], updates={"blob": "x" * 40_000})
    versions = await operator.set_config(await operator.select(everyone=True), updates={"u": 1})
    assert versions == {d: (2 if d == "d07" else 1) for d in ids}
    with pytest.raises(RegistryError, match="d07"):
        await operator.set_config(ids, updates={"more": "y" * 40_000})
    states = {s.device_id: s for s in await operator.config_states(ids)}
    assert {d: s.version for d, s in states.items()} == versions
    assert states["d00"].config == {"u": 1}
    with pytest.raises(RegistryError, match="cannot be stored"):
        await operator.set_config(["d00"], updates={"nul": "a\x00b"})


async def test_rotation_and_revocation_of_unknown_and_revoked_devices(
    operator: PostgresOperator,
) -> None:
    """Unknown devices are errors; revoking twice is not; a revoked device cannot rotate."""
    (token,) = await operator.add_many(["a"])
    with pytest.raises(RegistryError, match="no device 'ghost'"):
        await operator.revoke("ghost")
    with pytest.raises(RegistryError, match="no device 'ghost'"):
        await operator.rotate("ghost", 0)
    await operator.revoke("a")
    await operator.revoke("a")
    with pytest.raises(RegistryError, match="revoked"):
        await operator.rotate("a", 60)
    with pytest.raises(RegistryError, match="revoked"):
        await operator.select(["a"])
    assert hash_token(token)  # the token was minted, never stored


async def test_an_unreachable_database_is_a_clear_error_without_its_password() -> None:
    """Nothing listening: `RegistryUnavailable` naming the URL, its password masked."""
    url = f"postgresql://hub:s3cret-pw@127.0.0.1:{free_port()}/hub"
    with pytest.raises(RegistryUnavailable) as caught:
        await PostgresOperator.open(url)
    message = str(caught.value)
    assert "registry_url" in message and "127.0.0.1" in message
    assert "s3cret-pw" not in message


async def test_an_unknown_database_is_a_clear_error(postgres_db: PostgresDatabase) -> None:
    """A database that does not exist: `RegistryUnavailable` saying so."""
    url = postgres_db.dsn.rsplit("/", 1)[0] + "/no_such_db"
    with pytest.raises(RegistryUnavailable, match="no_such_db"):
        await PostgresRegistry.open(url, "hub-1", "127.0.0.1:8765")


async def test_hub_top_reads_presence_from_postgresql(
    postgres_db: PostgresDatabase, operator: PostgresOperator, tmp_path: Path
) -> None:
    """`hub top`'s registry read follows `registry_url`; a database it cannot reach is an
    empty view, not an error."""
    await operator.add_many(["a"])
    hub = await open_node(postgres_db, "hub-1")
    try:
        await hub.record_presence([online("a", stored=4)])
        settings = load_settings(state_dir=tmp_path / "state", registry_url=postgres_db.dsn)
        seen = await asyncio.to_thread(read_presence, settings)
        assert (seen["a"].online, seen["a"].readings_stored) == (True, 4)
        gone = settings.model_copy(
            update={"registry_url": f"postgresql://hub@127.0.0.1:{free_port()}/hub"}
        )
        assert await asyncio.to_thread(read_presence, gone) == {}
        assert not (tmp_path / "state").exists()  # SQLite was never opened
    finally:
        await hub.close()


class CountedPool:
    """A real pool, counting the statements `fetch` sends."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.fetches = 0

    async def fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        self.fetches += 1
        rows: list[asyncpg.Record] = await self.pool.fetch(query, *args)
        return rows


async def test_config_answers_of_one_loop_turn_are_recorded_in_one_statement(
    postgres_db: PostgresDatabase, operator: PostgresOperator
) -> None:
    """50 answers at once: one statement, each caller told its own outcome; a stale epoch's
    and a version not current are not recorded; the same device answering twice in one turn
    waits for the next statement (and, a repeat, does not count)."""
    ids = [f"d{n:02d}" for n in range(50)]
    await operator.add_many(ids)
    hub = await open_node(postgres_db, "hub-1")
    try:
        epochs = {}
        for device_id in ids:
            claim = await hub.claim(device_id, "192.0.2.1:1")
            assert claim is not None
            epochs[device_id] = claim.epoch
        await operator.set_config(ids, updates={"x": 1})
        pool = await asyncpg.create_pool(postgres_db.dsn, min_size=1, max_size=2)
        try:
            counted = CountedPool(pool)
            answers = ConfigAnswers(cast(asyncpg.Pool, counted), "hub-1")
            outcomes = await asyncio.gather(
                *(answers.record(d, epochs[d], 1, True, None) for d in ids[2:]),
                answers.record(ids[0], epochs[ids[0]] - 1, 1, True, None),  # stale epoch
                answers.record(ids[1], epochs[ids[1]], 2, True, None),  # not the current version
                answers.record(ids[2], epochs[ids[2]], 1, True, None),  # twice in one turn
            )
        finally:
            await pool.close()
        assert outcomes == [True] * 48 + [False, False, False]
        assert counted.fetches == 2  # the 50 first, then the repeat
        states = {s.device_id: s.acked_version for s in await operator.config_states(ids)}
        assert states == {d: (None if d in ids[:2] else 1) for d in ids}
    finally:
        await hub.close()
