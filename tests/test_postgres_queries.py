"""The registry's named PostgreSQL statements (hub.registry.postgres.queries): ownership, nodes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from uuid import UUID

import asyncpg
import pytest

from device_sim.servers.postgres import PostgresDatabase
from hub.registry.postgres import operator_queries as oq
from hub.registry.postgres import queries as q
from hub.registry.postgres.migrations import migrate
from hub.registry.sqlite import hash_token

pytestmark = pytest.mark.integration

LEASE_S = 30.0
SHORT_LEASE_S = 0.3
WAIT_S = 20.0
CLAIMERS = 12


@pytest.fixture
async def db(pg: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a freshly migrated registry database."""
    await migrate(pg)
    yield pg


async def add_devices(conn: asyncpg.Connection, *device_ids: str, labels: str = "{}") -> None:
    """Register devices with tokens derived from their ids (test tokens only)."""
    hashes = [hash_token(f"token-{d}") for d in device_ids]
    await conn.execute(oq.ADD_DEVICES, list(device_ids), hashes, labels)


async def register(conn: asyncpg.Connection, node_id: str, lease_s: float = LEASE_S) -> UUID:
    """Register a node and return its incarnation."""
    row = await conn.fetchrow(q.REGISTER_NODE, node_id, f"{node_id}.example:8765", lease_s)
    assert row is not None
    incarnation: UUID = row["incarnation"]
    return incarnation


async def claim(conn: asyncpg.Connection, device_id: str, node_id: str) -> asyncpg.Record:
    """Claim a connection that must succeed; return its row."""
    row = await conn.fetchrow(q.CLAIM_CONNECTION, device_id, node_id, "192.0.2.7:40000")
    assert row is not None, f"{node_id} could not claim {device_id}"
    return row


async def presence(conn: asyncpg.Connection) -> dict[str, asyncpg.Record]:
    """DEVICE_PRESENCE by device id."""
    return {row["device_id"]: row for row in await conn.fetch(q.DEVICE_PRESENCE)}


async def until(conn: asyncpg.Connection, sql: str, *args: object) -> None:
    """Wait until `sql` returns true (for lease expiry, which is the database's clock)."""
    deadline = time.monotonic() + WAIT_S
    while not await conn.fetchval(sql, *args):
        assert time.monotonic() < deadline, f"still false after {WAIT_S} s: {sql}"
        await asyncio.sleep(0.02)


async def test_a_claim_returns_a_growing_epoch_and_whom_it_took_over(
    db: asyncpg.Connection,
) -> None:
    """The first claim gets epoch 1 from nobody; the next one epoch 2 from the first owner."""
    await add_devices(db, "d1")
    await register(db, "hub-a")
    await register(db, "hub-b")
    first = await claim(db, "d1", "hub-a")
    assert (first["epoch"], first["previous_owner"], first["notified"]) == (1, None, 0)
    second = await claim(db, "d1", "hub-b")
    assert (second["epoch"], second["previous_owner"], second["previous_epoch"]) == (2, "hub-a", 1)
    assert second["notified"] == 1
    again = await claim(db, "d1", "hub-b")  # a reconnection to the same hub rings nobody
    assert (again["epoch"], again["previous_owner"], again["notified"]) == (3, "hub-b", 0)


async def test_concurrent_claims_form_one_chain_of_epochs(
    postgres_db: PostgresDatabase, db: asyncpg.Connection
) -> None:
    """Claims racing on many connections each take over from exactly the claim before."""
    await add_devices(db, "d1")
    nodes = [f"hub-{i}" for i in range(CLAIMERS)]
    for node in nodes:
        await register(db, node)
    conns = [await postgres_db.connect() for _ in nodes]
    try:
        rows = await asyncio.gather(
            *(claim(conn, "d1", node) for conn, node in zip(conns, nodes, strict=True))
        )
    finally:
        await asyncio.gather(*(conn.close() for conn in conns))
    by_epoch = {
        row["epoch"]: (node, row["previous_epoch"], row["previous_owner"])
        for node, row in zip(nodes, rows, strict=True)
    }
    assert sorted(by_epoch) == list(range(1, CLAIMERS + 1))
    for epoch, (_node, previous_epoch, previous_owner) in by_epoch.items():
        assert previous_epoch == epoch - 1
        assert previous_owner == (None if epoch == 1 else by_epoch[epoch - 1][0])


async def test_the_previous_owner_hears_the_takeover_on_its_channel(
    postgres_db: PostgresDatabase, db: asyncpg.Connection
) -> None:
    """A takeover rings the old owner's channel with `takeover:EPOCH:DEVICE_ID` (the new
    epoch), and only it."""
    await add_devices(db, "d1")
    await register(db, "hub-a")
    await register(db, "hub-b")
    heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    listener = await postgres_db.connect()
    try:
        for node in ("hub-a", "hub-b"):
            await listener.add_listener(
                q.node_channel(node),
                lambda _c, _p, channel, payload: heard.put_nowait((channel, payload)),
            )
        await claim(db, "d1", "hub-a")
        await claim(db, "d1", "hub-b")
        channel, payload = await asyncio.wait_for(heard.get(), WAIT_S)
        assert (channel, payload) == (q.node_channel("hub-a"), q.TAKEOVER_PAYLOAD_PREFIX + "2:d1")
        assert q.parse_takeover(payload) == ("d1", 2)
        await listener.execute("SELECT 1")  # any notification still queued arrives with this
        assert heard.empty()
    finally:
        await listener.close()


async def test_claims_are_refused_for_revoked_unknown_devices_and_expired_nodes(
    db: asyncpg.Connection,
) -> None:
    """No row for a revoked or unknown device, or for a node whose lease has expired."""
    await add_devices(db, "d1", "d2")
    await register(db, "hub-a")
    await register(db, "frozen", lease_s=SHORT_LEASE_S)
    await db.fetchrow(oq.REVOKE_DEVICE, "d2")
    address = "192.0.2.7:1"
    assert await db.fetchrow(q.CLAIM_CONNECTION, "d2", "hub-a", address) is None
    assert await db.fetchrow(q.CLAIM_CONNECTION, "nobody", "hub-a", address) is None
    await until(db, "SELECT lease_expires_at < now() FROM nodes WHERE node_id = 'frozen'")
    assert await db.fetchrow(q.CLAIM_CONNECTION, "d1", "frozen", address) is None
    assert await db.fetchrow(q.CLAIM_CONNECTION, "d1", "unregistered", address) is None
    assert await db.fetchval("SELECT epoch FROM connections WHERE device_id = 'd1'") == 0


async def answer(
    db: asyncpg.Connection,
    device_id: str,
    version: int,
    ok: bool,
    error: str | None,
    node: str,
    epoch: int,
) -> asyncpg.Record | None:
    """One config answer through RECORD_CONFIG_ACKS (the hub sends many at once)."""
    row: asyncpg.Record | None = await db.fetchrow(
        q.RECORD_CONFIG_ACKS, node, [device_id], [epoch], [version], [ok], [error]
    )
    return row


async def test_a_stale_owners_late_writes_lose_to_the_newer_epoch(db: asyncpg.Connection) -> None:
    """After a takeover, the old session's config answer, presence and release match nothing."""
    await add_devices(db, "d1")
    await register(db, "hub-a")
    await register(db, "hub-b")
    old = (await claim(db, "d1", "hub-a"))["epoch"]
    new = (await claim(db, "d1", "hub-b"))["epoch"]
    (pushed,) = await db.fetch(oq.PUSH_CONFIG, ["d1"], '{"interval_s": 5}', None)
    version = pushed["config_version"]
    ack = (version, False, "from the old session")
    assert await answer(db, "d1", *ack, "hub-a", old) is None
    assert await db.fetch(q.TOUCH_CONNECTIONS, "hub-a", ["d1"], [old]) == []
    assert await db.fetchrow(q.RELEASE_CONNECTION, "d1", "hub-a", old) is None
    token = [hash_token("token-d1")]
    stale = await db.fetch(q.STALE_SESSIONS, "hub-a", ["d1"], [old], [version], token)
    assert [(r["device_id"], r["reason"]) for r in stale] == [("d1", "taken_over")]
    state = await db.fetchrow(
        "SELECT acked_version, owner_node FROM devices JOIN connections"
        " USING (device_id) WHERE device_id = 'd1'"
    )
    assert (state["acked_version"], state["owner_node"]) == (None, "hub-b")
    # The current owner's writes go through, each once.
    assert await answer(db, "d1", version, True, None, "hub-b", new)
    assert await answer(db, "d1", version, True, None, "hub-b", new) is None
    assert [r["device_id"] for r in await db.fetch(q.TOUCH_CONNECTIONS, "hub-b", ["d1"], [new])]
    assert await db.fetch(q.STALE_SESSIONS, "hub-b", ["d1"], [new], [version], token) == []
    assert await db.fetchrow(q.RELEASE_CONNECTION, "d1", "hub-b", new) is not None
    assert (await presence(db))["d1"]["online"] is False


async def test_an_answer_racing_a_takeover_is_ordered_by_the_row_lock(
    postgres_db: PostgresDatabase, db: asyncpg.Connection
) -> None:
    """A config answer blocked behind an uncommitted takeover finds its epoch gone."""
    await add_devices(db, "d1")
    await register(db, "hub-a")
    await register(db, "hub-b")
    old = (await claim(db, "d1", "hub-a"))["epoch"]
    (pushed,) = await db.fetch(oq.PUSH_CONFIG, ["d1"], '{"interval_s": 5}', None)
    taker, answerer = await postgres_db.connect(), await postgres_db.connect()
    try:
        async with taker.transaction():
            await claim(taker, "d1", "hub-b")
            late = asyncio.ensure_future(
                answer(answerer, "d1", pushed["config_version"], True, None, "hub-a", old)
            )
            # The answer must be waiting on the claim's row lock before the claim commits.
            await until(
                db,
                "SELECT count(*) > 0 FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()",
            )
        assert await asyncio.wait_for(late, WAIT_S) is None
    finally:
        await taker.close()
        await answerer.close()
    assert await db.fetchval("SELECT acked_version FROM devices WHERE device_id = 'd1'") is None


async def test_presence_follows_the_owners_lease(db: asyncpg.Connection) -> None:
    """A device is online with its hub while that hub's lease lives, offline once it expires."""
    await add_devices(db, "d1", "d2")
    incarnation = await register(db, "hub-a")
    await claim(db, "d1", "hub-a")
    now = await presence(db)
    assert (now["d1"]["online"], now["d1"]["hub"]) == (True, "hub-a")
    assert (now["d2"]["online"], now["d2"]["hub"]) == (False, None)
    # Its last heartbeat before it froze: a short lease, so the test need not wait long.
    assert await db.fetchrow(q.HEARTBEAT, "hub-a", incarnation, SHORT_LEASE_S, 1) is not None
    await until(db, "SELECT NOT live FROM (" + q.NODES + ") AS n WHERE node_id = 'hub-a'")
    expired = await presence(db)
    assert (expired["d1"]["online"], expired["d1"]["hub"]) == (False, None)
    renewed = await db.fetchrow(q.HEARTBEAT, "hub-a", incarnation, LEASE_S, 1)
    assert renewed is not None
    assert renewed["lease_expires_at"] - await db.fetchval("SELECT now()") > timedelta(seconds=20)
    back = await presence(db)
    assert (back["d1"]["online"], back["d1"]["hub"]) == (True, "hub-a")
    (node,) = await db.fetch(q.NODES)
    assert (node["node_id"], node["live"], node["live_connections"]) == ("hub-a", True, 1)
    assert node["address"] == "hub-a.example:8765"
    assert node["heartbeat_at"] >= node["started_at"]


async def test_registering_again_replaces_the_incarnation_and_its_sessions(
    db: asyncpg.Connection,
) -> None:
    """A node id that registers again releases the old process's devices; its heartbeats fail."""
    await add_devices(db, "d1")
    first = await register(db, "hub-a")
    epoch = (await claim(db, "d1", "hub-a"))["epoch"]
    second = await register(db, "hub-a")
    assert second != first
    assert await db.fetchrow(q.HEARTBEAT, "hub-a", first, LEASE_S, 1) is None
    assert await db.fetchrow(q.HEARTBEAT, "hub-a", second, LEASE_S, 0) is not None
    assert (await presence(db))["d1"]["online"] is False
    token = [hash_token("token-d1")]
    stale = await db.fetch(q.STALE_SESSIONS, "hub-a", ["d1"], [epoch], [0], token)
    assert [r["reason"] for r in stale] == ["taken_over"]
    assert (await claim(db, "d1", "hub-a"))["epoch"] == epoch + 1


async def test_readings_stored_add_up_across_hubs(db: asyncpg.Connection) -> None:
    """Deltas from several hubs add up; repeats sum; unknown ids and non-positive are skipped."""
    await add_devices(db, "d1", "d2")
    await db.execute(q.ADD_READINGS_STORED, ["d1", "d2", "d1"], [10, 5, 2])
    await db.execute(q.ADD_READINGS_STORED, ["d1", "ghost", "d2"], [100, 7, 0])
    await db.execute(q.ADD_READINGS_STORED, ["d2"], [-3])
    counts = {d: row["readings_stored"] for d, row in (await presence(db)).items()}
    assert counts == {"d1": 112, "d2": 5}


def test_node_channel_is_the_same_in_python_and_sql_and_fits_an_identifier() -> None:
    """Long and odd node ids map to short, quote-free channel names."""
    for node_id in ("hub-a", "host.example:8765/2", "é" * 200):
        channel = q.node_channel(node_id)
        assert channel.startswith(q.CHANNEL_PREFIX) and len(channel.encode()) <= 63
        assert channel.replace("_", "").isalnum() and channel.islower()
    assert q.node_channel("a") != q.node_channel("b")


async def test_node_channel_matches_the_sql_function(db: asyncpg.Connection) -> None:
    """hub_node_channel() in SQL gives what node_channel() gives in Python."""
    for node_id in ("hub-a", "host.example:8765/2", "é" * 200):
        assert await db.fetchval("SELECT hub_node_channel($1)", node_id) == q.node_channel(node_id)
